"""``vitscale-rehearse``: run a job on a multi-node cluster made of network namespaces on this machine.

    vitscale-rehearse --nodes 2 --per-node 1 --launcher torchrun --iface ib0 CONFIG [key=value ...]
    vitscale-rehearse ... --slow-node 1:3             # node1's ranks at a third of the speed
    vitscale-rehearse ... --fail-node 1:8:link        # node1 leaves the network at step 8
    vitscale-rehearse --clean                         # remove what a killed rehearsal left

Each node is a network namespace with its own host name (node0, node1, ...) and an interface
named as on the cluster (``--iface``, default ib0) with an address from 198.18.0.0/15, the
range reserved for network benchmarks, on a bridge in a namespace of its own; nothing of the
machine's own network changes (``vitscale/rehearsal/cluster.py``). The job starts with the
chosen launcher as on a cluster (``vitscale/rehearsal/launchers.py``); each node's output goes
to ``RUN_DIR/rehearsal/nodeI.log`` and, prefixed ``[nodeI]``, to stdout. When the job ends, a
summary: each node's exit code and time, the fault and when it struck, the log lines that
name a lost node, a stopped rank or a straggler, and the last global throughput record.

When one node's launcher fails, the others get ``--grace`` seconds to end by themselves (a
lost node's peers end through the watchdog within ``parallel.heartbeat_s`` plus a beat: the
default grace is that plus 10 s); then the rest are killed (a vanished or frozen node never
ends by itself). Whatever happens (the job ends, fails, ``--timeout`` passes, Ctrl-C,
SIGTERM), every process, namespace, link, hosts file and cgroup it made is removed before
it exits. Exit code: 0 when every node's launcher
exits 0, else the first failing launcher's code (1 for a process killed by a signal).

Needs root, ``ip`` (iproute2), ``unshare``, ``nsenter``, ``mount`` (util-linux) and the cgroup
cpu controller; says so and exits 2 otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vitscale.rehearsal.cluster import Cluster, ClusterError, check_can_run, remove_stale
from vitscale.progress import LoggedSteps
from vitscale.rehearsal.faults import FaultError, inject, parse_fail, parse_slow, wait_for_step
from vitscale.rehearsal.launchers import LAUNCHERS, base_env, starts, write_shim

logger = logging.getLogger("vitscale.rehearse")

# Log lines worth repeating in the summary: a lost or stopped rank, a straggler, an error.
# (A Python exception's last line, not the launcher's own traceback of a failed child.)
_NOTABLE = re.compile(r"lost |stopped progressing|unreachable|straggler|network interface| ERROR |"
                      r"^\[node\d+\] [\w.]*(Error|Exception): \S")


class _Stop(Exception):
    """SIGTERM / SIGHUP, turned into an exception so that clean-up runs."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def _pump(stream, log_path: Path, prefix: str, notable: list[str], lock: threading.Lock) -> None:
    """Copy a node process's output to its log file and, prefixed, to our stdout."""
    with open(log_path, "ab") as log:
        for raw in iter(stream.readline, b""):
            log.write(raw)
            log.flush()
            line = raw.decode(errors="replace").rstrip()
            with lock:
                sys.stdout.write(f"{prefix} {line}\n")
                sys.stdout.flush()
                if _NOTABLE.search(f"{prefix} {line}") and len(notable) < 400:
                    notable.append(f"{prefix} {line}")


def _checked(config: str, overrides: list[str], world: int):
    """The config, checked with the layout for this world size."""
    from vitscale.config import load_config, validate_layout

    cfg = load_config(config, overrides)
    validate_layout(cfg, world)
    return cfg


def _last_global(metrics: Path) -> dict | None:
    last = None
    try:
        with open(metrics) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("kind") == "throughput" and rec.get("scope") == "global":
                    last = rec
    except FileNotFoundError:
        pass
    return last


def rehearse(args: argparse.Namespace) -> int:
    world = args.nodes * args.per_node
    cfg = _checked(args.config, args.overrides, world)
    run_dir = Path(cfg.run.dir)
    if args.grace is None:  # time for the survivors' watchdogs to see a lost node and end by themselves
        beat = cfg.parallel.heartbeat_s
        args.grace = beat + max(0.5, min(5.0, beat / 6)) + 10.0 if beat > 0 else 30.0
    slow = parse_slow(args.slow_node, args.nodes) if args.slow_node else None
    fail = parse_fail(args.fail_node, args.nodes) if args.fail_node else None
    check_can_run()
    state = run_dir / "rehearsal"
    if state.exists():
        for old in state.glob("node*.log"):
            old.unlink()
    cluster = Cluster(args.nodes, iface=args.iface)
    procs: list[tuple[object, subprocess.Popen]] = []
    ended: dict[int, tuple[int, float]] = {}  # index in procs -> (exit code, seconds after start)
    notable: list[str] = []
    pumps: list[threading.Thread] = []
    lock, events = threading.Lock(), []
    t0 = time.monotonic()
    old_handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C removes the cluster even where this process was started with SIGINT ignored (Python then
    # installs no KeyboardInterrupt handler of its own: a job started in the background, or by a parent
    # that ignores it, would run on and leave its namespaces).
    old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.build(state)
        shim = write_shim(state)
        threads = max(1, (os.cpu_count() or 1) // world)
        env = base_env(cluster.hosts_file, shim, threads)
        logger.info("rehearsal: %d nodes x %d ranks, %s, interface %s: %s", args.nodes, args.per_node,
                    args.launcher, args.iface, ", ".join(f"{n.host}={n.address}" for n in cluster.members))
        job = ["-m", "vitscale.train", args.config, *args.overrides]
        for s in starts(args.launcher, [n.host for n in cluster.members], args.per_node, job, state, args.iface):
            cmd = [str(shim), cluster.members[s.node].host, shlex.join(s.command)]
            proc = subprocess.Popen(cmd, env={**env, **s.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            pump = threading.Thread(target=_pump, args=(proc.stdout, state / f"node{s.node}.log", f"[node{s.node}]",
                                                        notable, lock), daemon=True)
            pump.start()
            pumps.append(pump)
            procs.append((s, proc))
        holder: dict = {}  # "done" ends the watching threads; "what" and "at" say what the fault did
        if slow:  # from the first logged step: start-up (imports, op builds) runs at full speed

            def slow_down(watch=LoggedSteps(run_dir / "metrics.jsonl", kind=None, from_end=True)):
                if wait_for_step(watch, 1, lambda: not holder.get("done")):
                    cluster.slow(slow.node, slow.factor, cores=args.per_node * threads)
                    events.append(f"node{slow.node} slowed {slow.factor:g}x from step {watch.step} (cgroup CPU "
                                  f"quota {args.per_node * threads / slow.factor:.2f} cores)")
                    logger.info("rehearsal: %s", events[-1])

            threading.Thread(target=slow_down, daemon=True).start()
        fault_at = None
        if fail:
            def strike(watch=LoggedSteps(run_dir / "metrics.jsonl", kind=None, from_end=True)):
                if wait_for_step(watch, fail.step, lambda: not holder.get("done")):
                    holder["what"] = inject(cluster, fail)
                    holder["at"] = time.monotonic()
                    logger.info("rehearsal: step %d reached: %s", fail.step, holder["what"])

            striker = threading.Thread(target=strike, daemon=True)
            striker.start()
        first_fail, killed = None, []
        while len(ended) < len(procs):
            now = time.monotonic()
            for i, (s, p) in enumerate(procs):
                if i not in ended and (rc := p.poll()) is not None:
                    ended[i] = (rc, now - t0)
                    if rc != 0 and first_fail is None:
                        first_fail = now
            if len(ended) == len(procs):
                break
            late = first_fail is not None and now - first_fail > args.grace
            if late or (args.timeout and now - t0 > args.timeout):
                why = (f"{args.grace:g} s after the first launcher failed" if late
                       else f"--timeout {args.timeout:g} s passed")
                for i, (s, p) in enumerate(procs):
                    if i not in ended:
                        killed.append(f"node{s.node} ({s.label}): killed, {why}")
                for n in range(args.nodes):
                    cluster.signal(n, signal.SIGKILL)
                for i, (s, p) in enumerate(procs):
                    if i not in ended:
                        p.wait(timeout=30)
                        ended[i] = (p.returncode, time.monotonic() - t0)
                break
            time.sleep(0.2)
        holder["done"] = True
        for pump in pumps:  # the last lines of every node before the summary
            pump.join(timeout=5)
        if fail:
            fault_at = holder.get("at")
            if holder.get("what"):
                events.append(f"step {fail.step}: {holder['what']} at {fault_at - t0:.1f} s")
            else:
                events.append(f"--fail-node {args.fail_node}: the run ended before step {fail.step}")
        return _summary(args, cluster, procs, ended, killed, events, notable, fault_at, t0, run_dir)
    except KeyboardInterrupt:
        logger.error("rehearsal: interrupted; removing the cluster")
        return 130
    except _Stop as e:
        logger.error("rehearsal: %s; removing the cluster", e)
        return 143
    finally:
        left = cluster.remove()
        for p in (p for _, p in procs):
            if p.poll() is None:
                p.kill()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if left:
            logger.error("rehearsal: could not remove %s (run vitscale-rehearse --clean)", "; ".join(left))
        else:
            logger.info("rehearsal: removed %d namespaces, their links, hosts files and cgroups",
                        args.nodes + 1)


def _summary(args, cluster, procs, ended, killed, events, notable, fault_at, t0, run_dir) -> int:
    out = [f"rehearsal summary: {args.nodes} nodes x {args.per_node} ranks, {args.launcher}, "
           f"interface {args.iface}"]
    for i, (s, p) in enumerate(procs):
        rc, at = ended[i]
        after = f", {at - (fault_at - t0):.1f} s after the fault" if fault_at and at > fault_at - t0 else ""
        node = cluster.members[s.node]
        out.append(f"  {node.host} ({node.address}) {s.label}: exit {rc} at {at:.1f} s{after}")
    out += [f"  fault: {e}" for e in events] + [f"  {k}" for k in killed]
    seen = set()
    for line in notable:
        key = re.sub(r"^\[node\d+\]\s+\S+ \S+ ", "", line)[:160]
        if key not in seen:
            seen.add(key)
            out.append(f"  log: {line[:300]}")
        if len(seen) >= 12:
            break
    g = _last_global(run_dir / "metrics.jsonl")
    if g:
        out.append(f"  last global throughput record: step {g.get('step')}, "
                   f"{g.get('samples_per_s', float('nan')):.4g} samples/s, slowest {g.get('slowest_host')}, "
                   f"fastest {g.get('fastest_host')}, stragglers {g.get('stragglers', [])}")
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()
    codes = [ended[i][0] for i in range(len(procs))]
    bad = [c for c in codes if c != 0]
    return 0 if not bad else (bad[0] if bad[0] > 0 else 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale-rehearse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="experiment YAML (or a shipped config's name)")
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    ap.add_argument("--nodes", type=int, default=2, help="nodes (network namespaces), default 2")
    ap.add_argument("--per-node", type=int, default=1, help="ranks per node, default 1")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    ap.add_argument("--iface", default="ib0", help="the nodes' interface name (default ib0)")
    ap.add_argument("--slow-node", metavar="I:FACTOR", help="node I's ranks at 1/FACTOR speed")
    ap.add_argument("--fail-node", metavar="I:STEP:KIND", help="at step STEP, node I: link (leaves the network), "
                    "freeze (SIGSTOP) or kill (SIGKILL)")
    ap.add_argument("--grace", type=float, default=None,
                    help="seconds the other launchers get to end after one fails, before they are killed "
                         "(default: parallel.heartbeat_s + a beat + 10 s, so that watchdogs can end them)")
    ap.add_argument("--timeout", type=float, default=0.0, help="kill the job after this many seconds (0: never)")
    ap.add_argument("--clean", action="store_true", help="remove what killed rehearsals left, then exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.clean:
            check_can_run()
            gone = remove_stale()
            logger.info("removed: %s", ", ".join(gone) if gone else "nothing was left")
            return 0
        if not args.config:
            ap.error("CONFIG is required")
        if args.nodes < 1 or args.per_node < 1:
            ap.error("--nodes and --per-node must be >= 1")
        return rehearse(args)
    except (ClusterError, FaultError) as e:
        logger.error("vitscale-rehearse: %s", e)
        return 2
    except Exception as e:  # a config error: the message says what to change
        from vitscale.config import ConfigError

        if isinstance(e, ConfigError):
            logger.error("vitscale-rehearse: %s", e)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
