"""Faults a rehearsal injects into one node: slow it, cut its link, freeze or kill it.

- ``--slow-node I:F``: node I's ranks run at 1/F speed (its cgroup's CPU quota: per-node
  ranks / F cores), from the first logged step (start-up runs at full speed).
- ``--fail-node I:STEP:link|freeze|kill``: when the run's ``metrics.jsonl`` first shows a
  record of step >= STEP written by this run (``progress.LoggedSteps``), node I's switch port
  goes down (a node vanishing from the network: its processes live on, its connections
  hang), or every process of node I gets SIGSTOP (alive, silent, holding its sockets), or
  SIGKILL (gone; its peers' connections reset).
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass

from vitscale.progress import LoggedSteps

KINDS = ("link", "freeze", "kill")


class FaultError(ValueError):
    pass


@dataclass(frozen=True)
class Slow:
    node: int
    factor: float


@dataclass(frozen=True)
class Fail:
    node: int
    step: int
    kind: str


def parse_slow(text: str, nodes: int) -> Slow:
    try:
        node, factor = text.split(":")
        slow = Slow(int(node), float(factor))
    except ValueError:
        raise FaultError(f"--slow-node {text!r}: write NODE:FACTOR, e.g. 1:3 (node 1 at a third of the speed)")
    if not 0 <= slow.node < nodes or slow.factor < 1:
        raise FaultError(f"--slow-node {text!r}: NODE must be 0..{nodes - 1} and FACTOR >= 1")
    return slow


def parse_fail(text: str, nodes: int) -> Fail:
    try:
        node, step, kind = text.split(":")
        fail = Fail(int(node), int(step), kind)
    except ValueError:
        raise FaultError(f"--fail-node {text!r}: write NODE:STEP:KIND, e.g. 1:8:link (KIND: {'|'.join(KINDS)})")
    if not 0 <= fail.node < nodes or fail.step < 1 or fail.kind not in KINDS:
        raise FaultError(f"--fail-node {text!r}: NODE must be 0..{nodes - 1}, STEP >= 1, KIND one of "
                         f"{', '.join(KINDS)}")
    return fail


def inject(cluster, fail: Fail) -> str:
    """Do it; returns what was done, for the log."""
    host = cluster.members[fail.node].host
    if fail.kind == "link":
        cluster.link_down(fail.node)
        return f"{host}'s link is down (its processes live on)"
    signum = signal.SIGSTOP if fail.kind == "freeze" else signal.SIGKILL
    n = cluster.signal(fail.node, signum)
    return f"{host}: {signal.Signals(signum).name} sent to its {n} processes"


def wait_for_step(watch: LoggedSteps, step: int, alive, poll_s: float = 0.05) -> bool:
    """Block until the run logs ``step`` (True) or ``alive()`` turns False (False)."""
    while alive():
        if watch.read() >= step:
            return True
        time.sleep(poll_s)
    return False
