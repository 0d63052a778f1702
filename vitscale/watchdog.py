"""The progress watchdog: every rank beats, every rank watches two peers, nobody depends on one rank.

What it ends, naming the rank and its host, with ``EXIT_LOST_RANK`` (75) on every rank:

- a rank that died (process or node): its beats stop; its watchers see it after
  ``parallel.heartbeat_s``;
- a rank that is alive but stopped progressing (stuck in Python, a loader, a kernel): it keeps
  beating, but its step does not advance. The ranks waiting for it in a collective get the
  collective's timeout (``parallel.timeout_s``, on every process group:
  ``distributed.set_new_group_timeout``) and say so (``settle``: state ``wait`` and one
  ``add`` to an aggregate counter). Once any rank has timed out that way, a watched peer that
  is not waiting itself and whose step has not moved for ``parallel.timeout_s`` is the one
  that stopped: "rank 1 (node 0, host h) stopped progressing in step 4: no step for 31 s";
- the host of global rank 0 lost: the job's key-value store (the TCPStore rank 0 hosts) is
  unreachable; each rank retries every beat (each store call bounded by a beat, 2 s at least:
  ``BoundedStore``) and
  ends after ``parallel.heartbeat_s`` without an answer.

Scale (1,000 ranks and more): one store serves the job, so no rank reads every rank's key.
Rank r writes its own key and reads, in one ``multi_get`` per beat, the keys of its two ring
neighbours (r - 1, r + 1) plus two aggregated keys: the verdict (``vitscale/lost``, posted
by whichever rank names a culprit first; everyone ends on it) and the count of ranks that
timed out in a collective. Every rank is watched by two others, so one lost rank, or a whole
node of consecutive ranks, is seen at its edges; the store's load is two requests per rank
per beat, O(1) per rank. Clocks are never compared across hosts: a peer's key is stale when
its value has not changed for so long on the watcher's own monotonic clock.

Heuristic and limit: when a collective times out, every rank stuck in the same step looks
stalled; a rank that has not (yet) timed out itself is blamed only after the first time-out
has been known for two beats, so that the other victims (which entered their collectives a
little later) can say they are waiting first. Under NCCL the victims are aborted by NCCL's
own watchdog at ``parallel.timeout_s`` rather than raising (CUDA work is asynchronous): their
beats stop, and the watchdog names them as lost, which ends the job in the same time but
blames a victim; tested here on gloo (CPU), where the victims raise and the culprit is named.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from vitscale.distributed import EXIT_LOST_RANK, ParallelDims

logger = logging.getLogger(__name__)

LOST_KEY, WAITING_KEY = "vitscale/lost", "vitscale/waiting"
RUN, WAIT, DONE = "run", "wait", "done"  # a rank's state: training, timed out in a collective, finished


def beat_key(rank: int) -> str:
    return f"vitscale/hb/{rank}"


def watched_peers(rank: int, world: int) -> list[int]:
    """The ranks ``rank`` watches: its ring neighbours (one peer in a world of two, none alone)."""
    return sorted({(rank - 1) % world, (rank + 1) % world} - {rank})


@dataclass
class _Peer:
    beat: str = ""
    beat_at: float = 0.0  # the watcher's clock when the beat last changed
    step: int | None = None
    step_at: float = 0.0  # ... when the step last changed
    state: str = RUN


@dataclass
class ProgressWatch:
    """The decisions of one rank's watchdog, without threads, store or clock of its own: feed it
    what the store said (``observe``) or that the store failed (``store_failed``), with the
    time; each returns None or a verdict ``(what, post)``: the text naming the culprit, and
    whether this rank must post it for the others (False when it read it from the store)."""

    rank: int
    world: int
    heartbeat_s: float  # a peer whose beat has not changed for this long is lost
    timeout_s: float  # ... whose step has not, while a rank timed out in a collective, stopped progressing
    interval_s: float
    where: Callable[[int], str]  # rank -> "rank 5 (node 1, host jwb0042)"
    now: float
    peers: list[int] = field(init=False)
    seen: dict[int, _Peer] = field(init=False)
    store_ok_at: float = field(init=False)
    waiting_since: float | None = field(init=False, default=None)
    failures: int = field(init=False, default=0)

    def __post_init__(self):
        self.peers = watched_peers(self.rank, self.world)
        self.seen = {p: _Peer(beat_at=self.now, step_at=self.now) for p in self.peers}
        self.store_ok_at = self.now

    def keys(self) -> list[str]:
        """What to read each beat, in one ``multi_get``: the watched peers' beats, the verdict, the count of waiters."""
        return [beat_key(p) for p in self.peers] + [LOST_KEY, WAITING_KEY]

    def observe(self, now: float, values: list[bytes]) -> tuple[str, bool] | None:
        if self.failures:
            logger.warning("the job's store answers again after %d failed beat(s)", self.failures)
        self.store_ok_at, self.failures = now, 0
        *beats, lost, waiting = [v.decode() for v in values]
        if lost:
            return lost, False
        waiters = int(waiting or 0)
        if waiters and self.waiting_since is None:
            self.waiting_since = now
        for p, value in zip(self.peers, beats):
            peer = self.seen[p]
            beat, step, state = value.split()
            peer.state = state
            if beat != peer.beat:
                peer.beat, peer.beat_at = beat, now
            if int(step) != peer.step:
                peer.step, peer.step_at = int(step), now
        for p in self.peers:
            peer = self.seen[p]
            if peer.state == DONE:
                continue
            silent = now - peer.beat_at
            if silent > self.heartbeat_s:
                return f"lost {self.where(p)}: no heartbeat for {silent:.0f} s (parallel.heartbeat_s={self.heartbeat_s:g})", True
            stalled = now - peer.step_at
            if (peer.state == RUN and stalled > self.timeout_s and self.waiting_since is not None
                    and now - self.waiting_since >= 2 * self.interval_s):
                step = "before its first step" if peer.step is None or peer.step < 0 else f"in step {peer.step + 1}"
                return (f"{self.where(p)} stopped progressing {step}: no step for {stalled:.0f} s "
                        f"(parallel.timeout_s={self.timeout_s:g}) while {waiters} rank(s) timed out waiting in a "
                        "collective", True)
        return None

    def store_failed(self, now: float, error: BaseException) -> tuple[str, bool] | None:
        """A store call failed or timed out: retried at the next beat; after ``heartbeat_s``
        without an answer the store's host (global rank 0's) is taken for lost."""
        self.failures += 1
        down = now - self.store_ok_at
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        if down > self.heartbeat_s:
            return (f"lost {self.where(0)}, which hosts the job's store: no answer for {down:.0f} s "
                    f"(parallel.heartbeat_s={self.heartbeat_s:g}; {self.failures} tries, last: {text})", False)
        if self.failures == 1:
            logger.warning("the job's store did not answer (%s); retrying every %.1f s for up to %g s", text,
                           self.interval_s, self.heartbeat_s)
        return None


class BoundedStore:
    """A key-value store whose every call returns or fails within ``bound_s``, and that
    reconnects after an error.

    A TCPStore client's own timeout bounds connecting and ``wait``, not an answer that never
    comes: when the store's host stops answering (a node off the network, a frozen process)
    ``get`` / ``multi_get`` block for good. So each call runs on a helper thread and is waited
    for at most ``bound_s``; while a call is still stuck, later ones fail at once (no pile of
    stuck threads), and once it returns the store is used again (a transient stall). A call
    that fails (a reset connection leaves a TCPStore client broken for good) drops the client:
    the next call connects again (``connect``, inside the bound too).

    Args:
        connect: () -> a store client.
        bound_s: the longest a call may take.
        client: a client already connected (default: ``connect()`` at the first call).
    """

    def __init__(self, connect: Callable[[], object], bound_s: float, client=None):
        self.connect, self.bound_s = connect, bound_s
        self._client = client
        self._pending: threading.Thread | None = None

    def __call__(self, method: str, *args):
        if self._pending is not None and self._pending.is_alive():
            raise TimeoutError(f"the store has not answered a call for more than {self.bound_s:g} s")
        result: list = []

        def call() -> None:
            try:
                if self._client is None:
                    self._client = self.connect()
                result.append((True, getattr(self._client, method)(*args)))
            except BaseException as e:  # handed to the caller
                self._client = None
                result.append((False, e))

        # a daemon thread, not a pool's: one stuck for good must not hold up the interpreter's exit
        self._pending = threading.Thread(target=call, name="vitscale-store", daemon=True)
        self._pending.start()
        self._pending.join(self.bound_s)
        if not result:
            raise TimeoutError(f"no answer from the store within {self.bound_s:g} s")
        ok, value = result[0]
        if not ok:
            raise value
        return value


class Heartbeat:
    """The watchdog's thread on this rank (module docstring). Use it as a context manager around
    the training; ``watch_progress`` hands it the step counter once the engine exists; leaving
    the context says ``done`` and stops the thread before the closing barrier, so that a rank
    that leaves first is never taken for lost.

    Args:
        dims: this rank's place.
        heartbeat_s: ``parallel.heartbeat_s`` (0: no watchdog).
        timeout_s: ``parallel.timeout_s``.
        interval_s: time between beats (default: ``heartbeat_s`` / 6, within [0.5, 5] s); a
            store call waits at most this long (at least 2 s).
    """

    def __init__(self, dims: ParallelDims, heartbeat_s: float, timeout_s: float, interval_s: float | None = None):
        self.dims, self.heartbeat_s, self.timeout_s = dims, heartbeat_s, timeout_s
        self.interval_s = interval_s if interval_s is not None else max(0.5, min(5.0, heartbeat_s / 6))
        self._step: Callable[[], int] = lambda: -1
        self._state = RUN
        self._wake = threading.Event()
        self._stopping = False
        self._thread = None

    def watch_progress(self, step: Callable[[], int]) -> None:
        """``step()`` -> the steps this rank has completed (read by the thread every beat)."""
        self._step = step

    def __enter__(self) -> Heartbeat:
        import torch.distributed as dist

        if self.heartbeat_s <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        bound = max(2.0, self.interval_s)
        connect = _own_client(bound)
        client = connect()
        client.set(beat_key(self.dims.rank), f"0 -1 {RUN}")
        if self.dims.rank == 0:
            client.set(LOST_KEY, "")
            client.set(WAITING_KEY, "0")
        self._store = BoundedStore(connect, bound, client)
        dist.barrier()  # every key exists before anyone reads them
        self._watch = ProgressWatch(self.dims.rank, self.dims.world_size, self.heartbeat_s, self.timeout_s,
                                    self.interval_s, self.where, time.monotonic())
        self._thread = threading.Thread(target=self._run, name="vitscale-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            try:  # so that a watcher still training does not take this rank's silence for a loss
                self._store("set", beat_key(self.dims.rank), f"done {self._step()} {DONE}")
            except Exception:
                pass

    def settle(self, error: BaseException) -> None:
        """After a failed collective: if it looks like a peer's fault (a time-out, a closed
        connection), say this rank is waiting and let the watchdog name the culprit and end the
        job (bounded: ``heartbeat_s`` and three beats); return at once for any other error."""
        import signal

        text = str(error).lower()
        peer = any(w in text for w in ("connection", "peer", "timed out", "timeout", "nccl", "gloo", "socket"))
        if self._thread is None or not peer:
            return
        wait = max(self.heartbeat_s, 3 * self.interval_s) + 3 * self.interval_s
        logger.error("%s: a collective failed in step %d (%s); waiting up to %.0f s for the watchdog to tell which "
                     "rank stopped or was lost", self.where(self.dims.rank), self._step() + 1,
                     str(error).strip().splitlines()[0][:300], wait)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing left to save: a launcher's SIGTERM ends us at once
        self._state = WAIT
        self._wake.set()
        time.sleep(wait)

    def where(self, rank: int) -> str:
        node = self.dims.node_of_rank[rank]
        return f"rank {rank} (node {node}, host {self.dims.node_hosts[node]})"

    def _run(self) -> None:
        store, watch, beat, said_waiting = self._store, self._watch, 0, False
        while True:
            if beat:
                self._wake.wait(self.interval_s)
                self._wake.clear()
            if self._stopping:
                return
            beat += 1
            try:
                state = self._state
                store("set", beat_key(self.dims.rank), f"{beat} {self._step()} {state}")
                if state == WAIT and not said_waiting:
                    store("add", WAITING_KEY, 1)
                    said_waiting = True
                verdict = watch.observe(time.monotonic(), store("multi_get", watch.keys()))
            except Exception as e:  # every call is bounded (BoundedStore)
                if self._stopping:
                    return
                verdict = watch.store_failed(time.monotonic(), e)
            if verdict is not None:
                self._end(*verdict)

    def _end(self, what: str, post: bool) -> None:
        logger.error("%s; ending the job on %s (exit code %d). Resubmit with checkpoint.resume=auto to continue "
                     "from the last complete checkpoint", what, self.where(self.dims.rank), EXIT_LOST_RANK)
        if post:  # the other ranks read the verdict at their next beat: wait two before the store may go
            try:
                self._store("set", LOST_KEY, what)
                time.sleep(2 * self.interval_s)
            except Exception:
                pass
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_LOST_RANK)


def _own_client(timeout_s: float) -> Callable[[], object]:
    """How to open a connection of the watchdog's own to the job's store (the process group's
    client waits as long as the group's timeout, and is not ours to change): a TCPStore client
    whose connecting is bounded by ``timeout_s``; the group's store itself where it is not a
    TCPStore (a FileStore in tests)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    store = base = _get_default_store()
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        host, port = base.host, base.port
        return lambda: dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                     wait_for_workers=False)
    return lambda: store
