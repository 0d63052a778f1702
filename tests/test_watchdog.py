"""Issue 19: the progress watchdog's decisions (vitscale/watchdog.py) on a fake clock, against a
real TCPStore in this process; every process group carries parallel.timeout_s."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from tests.conftest import free_port

from vitscale.watchdog import LOST_KEY, WAITING_KEY, BoundedStore, ProgressWatch, beat_key, watched_peers

HB, TIMEOUT, BEAT = 10.0, 30.0, 2.0


def where(rank: int) -> str:
    return f"rank {rank} (node {rank // 4}, host h{rank // 4})"


@pytest.fixture
def store():
    """A real TCPStore (this process hosts it, as global rank 0 does) and a client with a short bound."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    client = dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=1),
                           wait_for_workers=False)
    client.set(LOST_KEY, "")
    client.set(WAITING_KEY, "0")
    yield master, client


def beat(store, rank: int, n: int, step: int, state: str = "run") -> None:
    store.set(beat_key(rank), f"{n} {step} {state}")


def test_each_rank_watches_its_two_ring_neighbours_only():
    assert watched_peers(0, 1000) == [1, 999] and watched_peers(500, 1000) == [499, 501]
    assert watched_peers(0, 2) == [1] and watched_peers(1, 2) == [0] and watched_peers(0, 1) == []
    watch = ProgressWatch(7, 1000, HB, TIMEOUT, BEAT, where, now=0.0)
    assert len(watch.keys()) == 4  # two peers and two aggregated keys, whatever the world size
    watched_by = {r: [w for w in range(16) if r in watched_peers(w, 16)] for r in range(16)}
    assert all(len(w) == 2 for w in watched_by.values())  # everyone has two watchers


def test_a_peer_whose_beats_stop_is_lost_after_heartbeat_s(store):
    _, client = store
    watch = ProgressWatch(5, 8, HB, TIMEOUT, BEAT, where, now=0.0)
    beat(client, 4, 1, 10)
    beat(client, 6, 1, 10)
    assert watch.observe(0.0, client.multi_get(watch.keys())) is None
    t = 0.0
    while t < HB:  # rank 6 beats and steps; rank 4 is silent
        t += BEAT
        beat(client, 6, int(t), 10 + int(t))
        assert watch.observe(t, client.multi_get(watch.keys())) is None, t
    beat(client, 6, 99, 99)
    what, post = watch.observe(HB + 1, client.multi_get(watch.keys()))
    assert post and what.startswith("lost rank 4 (node 1, host h1): no heartbeat for 11 s"), what


def test_a_beating_peer_whose_step_stopped_is_named_once_a_rank_timed_out_in_a_collective(store):
    _, client = store
    watch = ProgressWatch(0, 2, HB, TIMEOUT, BEAT, where, now=0.0)
    beat(client, 1, 1, 3)  # rank 1 completed step 3, then stops progressing (beating on)
    assert watch.observe(0.0, client.multi_get(watch.keys())) is None
    t, n = 0.0, 1
    while t < TIMEOUT + 20:  # long past timeout_s: nobody waits for it yet, so nobody is blamed
        t, n = t + BEAT, n + 1
        beat(client, 1, n, 3)
        assert watch.observe(t, client.multi_get(watch.keys())) is None, t
    client.add(WAITING_KEY, 1)  # rank 0's collective timed out (Heartbeat.settle)
    beat(client, 1, n + 1, 3)
    assert watch.observe(t + BEAT, client.multi_get(watch.keys())) is None  # grace: two beats
    beat(client, 1, n + 2, 3)
    what, post = watch.observe(t + 3 * BEAT, client.multi_get(watch.keys()))
    assert post and what.startswith("rank 1 (node 0, host h0) stopped progressing in step 4: no step for"), what


def test_a_peer_that_waits_in_a_collective_or_is_done_is_not_blamed(store):
    _, client = store
    watch = ProgressWatch(0, 4, HB, TIMEOUT, BEAT, where, now=0.0)
    client.add(WAITING_KEY, 2)
    for n, t in enumerate([0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0], 1):
        beat(client, 1, n, 3, "wait")  # a victim: timed out in a collective, beating
        beat(client, 3, 0 if t == 0.0 else "done", 8, "run" if t == 0.0 else "done")  # left the training
        assert watch.observe(t, client.multi_get(watch.keys())) is None, t
    beat(client, 1, 9, 3, "run")  # the same stale step in state run: now it is the one
    what, _ = watch.observe(70.0, client.multi_get(watch.keys()))
    assert what.startswith("rank 1 (node 0, host h0) stopped progressing in step 4"), what


def test_a_verdict_posted_by_any_rank_ends_every_rank(store):
    _, client = store
    watch = ProgressWatch(3, 8, HB, TIMEOUT, BEAT, where, now=0.0)
    for r in (2, 4):
        beat(client, r, 1, 5)
    assert watch.observe(1.0, client.multi_get(watch.keys())) is None
    client.set(LOST_KEY, "rank 6 (node 1, host h1) stopped progressing in step 6")
    assert watch.observe(2.0, client.multi_get(watch.keys())) == (
        "rank 6 (node 1, host h1) stopped progressing in step 6", False)


def test_store_errors_are_retried_then_rank_0s_host_is_blamed():
    """The store's host stops answering (its process frozen with SIGSTOP: connections stay open,
    nothing comes back, as when a node drops off the network; a TCPStore client's get then
    blocks for good): every call fails within BoundedStore's bound, the watchdog retries for
    heartbeat_s, then names rank 0's host."""
    port = free_port()
    host = _store_host(port)
    try:
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60), wait_for_workers=False)
        client.set(LOST_KEY, "")
        client.set(WAITING_KEY, "0")
        store = BoundedStore(lambda: client, 1.0, client)
        watch = ProgressWatch(1, 2, HB, TIMEOUT, BEAT, where, now=0.0)
        beat(client, 0, 1, 1)
        assert watch.observe(0.0, store("multi_get", watch.keys())) is None
        for t in (2.0, 4.0):  # a transient error: tolerated, and forgotten once the store answers
            assert watch.store_failed(t, RuntimeError("Connection reset by peer")) is None
        beat(client, 0, 2, 2)
        assert watch.observe(6.0, store("multi_get", watch.keys())) is None and watch.failures == 0
        os.kill(host.pid, signal.SIGSTOP)
        t, verdict, errors = 6.0, None, []
        while verdict is None:
            t += BEAT
            start = time.monotonic()
            with pytest.raises(TimeoutError) as error:
                store("multi_get", watch.keys())
            assert time.monotonic() - start < 3, "a store call outlived its bound"
            errors.append(str(error.value))
            verdict = watch.store_failed(t, error.value)
            assert t <= 6.0 + HB + BEAT, "not blamed within heartbeat_s plus a beat"
        what, post = verdict
        assert t > 6.0 + HB  # retried for heartbeat_s first
        assert errors[0].startswith("no answer from the store within 1 s")  # then: the first call is still stuck
        assert errors[-1].startswith("the store has not answered a call for more than 1 s")
        assert not post and what.startswith("lost rank 0 (node 0, host h0), which hosts the job's store: no answer "
                                            "for 12 s"), what
        os.kill(host.pid, signal.SIGCONT)  # the stuck call returns: the store is used again
        time.sleep(1.0)
        assert store("multi_get", [LOST_KEY]) == [b""]
    finally:
        os.killpg(host.pid, signal.SIGKILL)
        host.wait()


def _store_host(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"""
import time, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", {port}, is_master=True, wait_for_workers=False)
time.sleep(300)"""], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_broken_store_connection_is_opened_again_at_the_next_call():
    """A reset connection leaves a TCPStore client broken for good: BoundedStore drops it after
    the failed call and connects again at the next one (a transient fault costs one beat)."""
    port = free_port()
    hosts = [_store_host(port)]
    try:
        def connect():
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30),
                                 wait_for_workers=False)

        store = BoundedStore(connect, 30.0)
        store("set", "k", "1")
        assert store("multi_get", ["k"]) == [b"1"]
        os.killpg(hosts[0].pid, signal.SIGKILL)
        hosts[0].wait()
        with pytest.raises(RuntimeError):  # the connection is gone: an error, within the bound
            store("multi_get", ["k"])
        hosts.append(_store_host(port))  # the store back (empty) on the same port
        store("set", "k", "2")
        assert store("multi_get", ["k"]) == [b"2"]
    finally:
        for host in hosts:
            if host.poll() is None:
                os.killpg(host.pid, signal.SIGKILL)
            host.wait()


def _group_timeouts_in_every_layout(rank, world):
    """init_distributed's grid (DeepSpeed's PipelineParallelGrid: data, tensor, pipe, model and
    p2p groups) and a group made later through deepspeed.comm (as ZeRO and deepspeed.utils.groups
    make theirs) all carry parallel.timeout_s, not gloo's 30 minutes; an explicit timeout stays."""
    import deepspeed.comm as ds_dist
    import torch.distributed as tdist

    from vitscale.distributed import group_timeouts, init_distributed

    init_distributed(pipe=2, tensor=1, timeout_s=17)  # the world group exists already (run_in_gloo's)
    ds_dist.new_group(ranks=[0, 1])
    tdist.new_group([0, 1], timeout=timedelta(seconds=5))
    world = tdist.distributed_c10d._get_default_group().group_name
    timeouts = {name: s for name, s in group_timeouts().items() if not name.startswith(f"group {world} ")}
    assert len(timeouts) >= 6, timeouts  # data, pipe, model, p2p, ... groups on this rank, and ours
    assert sorted(timeouts.values()) == [5.0] + [17.0] * (len(timeouts) - 1), timeouts


@pytest.mark.distributed
def test_every_process_group_carries_the_configured_timeout():
    from tests.conftest import run_in_gloo

    run_in_gloo(_group_timeouts_in_every_layout, 2)
