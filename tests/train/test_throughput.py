"""Throughput records from handmade per-rank timings: MFU / HFU arithmetic on a known case,
per-node figures for data, tensor, pipe and pipe x data layouts (a pipeline spanning nodes as
vit_22b.yaml's), straggler naming and warning (no process group); and the step times of a
run adding up to its wall time."""
import logging
import time
from types import SimpleNamespace

import pytest
import torch

from vitscale.train.throughput import ThroughputMeter


def meter(node_of_rank, hosts, global_batch=1024, flops=35e9, peak=312.0, recompute=False, fraction=0.8,
          steps=10, tensor=1, pipe=1, stage_flops=None):
    world = len(node_of_rank)
    dims = SimpleNamespace(world_size=world, pipe=pipe, tensor=tensor, data=world // (pipe * tensor),
                           num_nodes=len(hosts), node=0, node_of_rank=node_of_rank, node_hosts=hosts,
                           device=torch.device("cpu"), is_main=True)
    m = ThroughputMeter(dims, global_batch, int(flops), warmup_steps=2, peak_tflops=peak, recompute=recompute,
                        straggler_fraction=fraction, stage_flops=stage_flops)
    m.steps_done = steps
    return m


# 8 ranks on 2 nodes, 10 timed steps of batch 1024 in 10 s: rows are
# [elapsed_s, data_wait_s, data_rank, forward_s, stage].
TABLE = [[10.0, 1.0, r, 2.0, 0] for r in range(4)] + [[10.0, 3.0, r, 4.0, 0] for r in range(4, 8)]


def test_mfu_arithmetic_on_a_known_case():
    # ViT-B/16-like 35 GFLOP forward per image on A100s (312 TFLOP/s bf16):
    # 1024 samples/s over 8 devices = 128 per device; 128 x 3 x 35e9 = 13.44 TFLOP/s; 13.44 / 312 MFU.
    glob, node0, node1 = meter([0] * 4 + [1] * 4, ["a", "b"]).build_records(12, TABLE)
    assert glob["samples_per_s"] == pytest.approx(1024.0)
    assert glob["samples_per_s_per_device"] == pytest.approx(128.0)
    assert glob["tflops_per_device"] == pytest.approx(13.44)
    assert glob["mfu"] == pytest.approx(13.44 / 312) and glob["hfu"] == pytest.approx(13.44 / 312)
    assert glob["samples"] == 12 * 1024 and glob["measured_samples"] == 10 * 1024
    assert glob["data_wait_fraction"] == pytest.approx((4 * 1.0 + 4 * 3.0) / 80)
    # With activation recomputation the hardware runs 4 forwards: 128 x 4 x 35e9 = 17.92 TFLOP/s.
    hfu = meter([0] * 4 + [1] * 4, ["a", "b"], recompute=True).build_records(12, TABLE)[0]
    assert hfu["mfu"] == pytest.approx(13.44 / 312) and hfu["hfu"] == pytest.approx(17.92 / 312)
    # Each node: its 4 replicas x 128 samples per step, 10 steps in 10 s.
    for rec, host, wait in ((node0, "a", 0.1), (node1, "b", 0.3)):
        assert rec["scope"] == "node" and rec["hostname"] == host and rec["devices"] == 4
        assert rec["samples_per_s"] == pytest.approx(512.0) and rec["data_wait_fraction"] == pytest.approx(wait)
    assert node0["fwd_samples_per_s"] == pytest.approx(5120 / 2.0)
    assert node1["fwd_samples_per_s"] == pytest.approx(5120 / 4.0)


def test_slow_node_is_named_and_warned_about(caplog):
    # Forward pace 2560 vs 1280 samples/s: median 1920, spread 1280 / 1920; 1280 < 0.8 x 1920.
    with caplog.at_level(logging.WARNING, logger="vitscale.train.throughput"):
        glob = meter([0] * 4 + [1] * 4, ["jwb0001", "jwb0002"]).build_records(12, TABLE)[0]
    assert glob["straggler_basis"] == "fwd_samples_per_s"
    assert (glob["slowest_node"], glob["slowest_host"], glob["fastest_node"], glob["fastest_host"]) == \
        (1, "jwb0002", 0, "jwb0001")
    assert glob["node_spread"] == pytest.approx(1280 / 1920)
    assert glob["stragglers"] == ["jwb0002"]
    assert "straggler: node 1 (jwb0002) runs at 1280 fwd_samples_per_s, 0.67 of the median node's 1920" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitscale.train.throughput"):  # 1280 >= 0.6 x 1920
        assert meter([0] * 4 + [1] * 4, ["a", "b"], fraction=0.6).build_records(12, TABLE)[0]["stragglers"] == []
    assert "straggler" not in caplog.text


def test_three_nodes_median_and_tensor_peers():
    # tensor 2: ranks (0, 1) share data rank 0, so a 2-rank node is one replica of 512 / 2 = 256 samples a step.
    table = [[4.0, 0.0, 0, 1.0, 0], [4.0, 0.0, 0, 1.0, 0], [4.0, 0.0, 1, 1.0, 0], [4.0, 0.0, 1, 1.0, 0],
             [4.0, 0.0, 2, 1.6, 0], [4.0, 0.0, 2, 1.6, 0]]
    recs = meter([0, 0, 1, 1, 2, 2], ["a", "b", "c"], global_batch=768, steps=4, tensor=2).build_records(4, table)
    assert [r["samples_per_s"] for r in recs[1:]] == pytest.approx([256.0] * 3)
    assert [r["fwd_samples_per_s"] for r in recs[1:]] == pytest.approx([1024.0, 1024.0, 640.0])
    assert recs[0]["stragglers"] == ["c"] and recs[0]["node_spread"] == pytest.approx(384 / 1024)


def test_without_forward_timings_the_pace_is_steps_per_s():
    # A pipeline (2 stages, one per node, the first holding 3/4 of the FLOPs): no forward of its own is
    # timed, and the nodes' samples/s differ by their share of the work, so the pace is steps/s.
    table = [[10.0, 0.0, 0, 0.0, 0], [20.0, 0.0, 0, 0.0, 1]]
    glob, a, b = meter([0, 1], ["a", "b"], global_batch=64, steps=10, pipe=2, stage_flops=[3, 1]).build_records(10, table)
    assert glob["straggler_basis"] == "steps_per_s" and a["fwd_samples_per_s"] is None
    assert (a["steps_per_s"], b["steps_per_s"]) == pytest.approx((1.0, 0.5))
    # node a: 640 samples x 3/4 of the work, node b: 640 x 1/4, both over the job's 20 s (a step is
    # common to all nodes: a node's own clock is its own_elapsed), so they add up to the global 32
    assert (a["samples_per_s"], b["samples_per_s"]) == pytest.approx((24.0, 8.0))
    assert (a["own_elapsed"], b["own_elapsed"]) == (10.0, 20.0)
    assert glob["samples_per_s"] == pytest.approx(32.0) and glob["slowest_host"] == "b"


def _grid(pipe, data, tensor, per_node):
    """DeepSpeed's rank order (PipeModelDataParallelTopology: pipe, data, tensor from slowest to
    fastest), ``per_node`` consecutive ranks per host: (node of each rank, stage, data rank)."""
    ranks = range(pipe * data * tensor)
    return ([r // per_node for r in ranks], [r // (data * tensor) for r in ranks],
            [(r // tensor) % data for r in ranks])


# (pipe, data, tensor, ranks per node, stage FLOPs, global batch, samples/step credited to each node by hand)
LAYOUTS = {
    # 8 ranks, 2 nodes: each node's 4 replicas of 1024 / 8 = 128 samples
    "data": (1, 8, 1, 4, None, 1024, [512, 512]),
    # tensor 4 over 2 nodes of 2 ranks: each node holds half of each of the 2 replicas' 512-sample work
    "tensor across nodes": (1, 2, 4, 2, None, 1024, [256, 256, 256, 256]),
    # tensor 2 inside a node, 3 replicas of 64 samples
    "tensor inside nodes": (1, 3, 2, 2, None, 192, [64, 64, 64]),
    # one pipeline of 2 stages, one per node, stage 0 holding 3 of 4 FLOP units: 96 x 3/4, 96 x 1/4
    "pipe": (2, 1, 1, 1, [3, 1], 96, [72, 24]),
    # pipe 2 x data 3 on nodes of 2 ranks: ranks 0-2 stage 0 (4 samples x 3/4 = 3 each), 3-5 stage 1 (1 each);
    # the middle node holds one rank of each stage
    "pipe x data": (2, 3, 1, 2, [3, 1], 12, [6, 4, 2]),
    # vit_22b.yaml: pipe 8 x tensor 4, one stage per 4-GPU node, here 2 data copies (16 nodes). Stage
    # FLOPs in units: embedding 1 + 6 blocks of 6 / 6 blocks / 6 blocks + head 1 = 7, 6 x 6, 7 of 50.
    # A node: its replica's 512 samples x its stage's share: 512 x 7/50 = 71.68, 512 x 6/50 = 61.44.
    "vit_22b": (8, 2, 4, 4, [7, 6, 6, 6, 6, 6, 6, 7], 1024,
                [71.68, 71.68] + [61.44] * 12 + [71.68, 71.68]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_node_samples_add_up_to_the_global_figure(layout):
    pipe, data, tensor, per_node, stages, batch, expected = LAYOUTS[layout]
    node_of_rank, stage, data_rank = _grid(pipe, data, tensor, per_node)
    hosts = [f"n{i}" for i in range(max(node_of_rank) + 1)]
    table = [[10.0, 0.0, data_rank[r], 0.0, stage[r]] for r in range(len(node_of_rank))]  # 10 steps in 10 s
    glob, *nodes = meter(node_of_rank, hosts, global_batch=batch, steps=10, tensor=tensor, pipe=pipe,
                         stage_flops=stages).build_records(10, table)
    assert [n["samples_per_s"] for n in nodes] == pytest.approx(expected)
    assert [n["measured_samples"] for n in nodes] == [round(10 * e) for e in expected]
    assert sum(n["samples_per_s"] for n in nodes) == pytest.approx(glob["samples_per_s"])
    assert glob["samples_per_s"] == pytest.approx(batch)
    assert sum(n["work_fraction"] for n in nodes) == pytest.approx(1.0)


def test_a_pipeline_node_is_credited_with_its_stage_flops():
    # vit_22b-like: 50 GFLOP forward per image, stage 0 (embedding + 6 blocks) 7 GFLOP of it. Node 0 holds
    # stage 0's 4 tensor ranks of data copy 0: per step they run 512 images x 7 GFLOP x 3 (forward + backward)
    # = 10.752 TFLOP, in 1 s on 4 devices: 2.688 TFLOP/s per device (the whole job: 1024 x 50e9 x 3 / 64).
    node_of_rank, stage, data_rank = _grid(8, 2, 4, 4)
    table = [[10.0, 0.0, data_rank[r], 0.0, stage[r]] for r in range(64)]
    stages = [int(7e9)] + [int(6e9)] * 6 + [int(7e9)]
    glob, *nodes = meter(node_of_rank, [f"n{i}" for i in range(16)], global_batch=1024, flops=50e9, peak=1000.0,
                         steps=10, tensor=4, pipe=8, stage_flops=stages).build_records(10, table)
    assert nodes[0]["tflops_per_device"] == pytest.approx(2.688)
    assert nodes[0]["mfu"] == pytest.approx(2.688 / 1000)
    assert nodes[2]["tflops_per_device"] == pytest.approx(512 * 6e9 * 3 / 4 / 1e12)  # a middle stage: 2.304
    assert glob["tflops_per_device"] == pytest.approx(1024 * 50e9 * 3 / 64 / 1e12)
    # the nodes' FLOPs add up to the job's
    assert sum(n["tflops_per_device"] * n["devices"] for n in nodes) == pytest.approx(glob["tflops_per_device"] * 64)


def test_stage_flops_must_match_the_pipeline():
    with pytest.raises(ValueError, match="one non-negative count per pipeline stage"):
        meter([0, 1], ["a", "b"], pipe=2, stage_flops=[1, 2, 3])


def test_step_times_add_up_to_the_wall_time_of_a_run():
    # A small model trained for 30 steps on the CPU, with a data wait inside each step. The wall time is
    # measured here, independently, from the end of the warm-up to the last step; the meter's
    # per-step times must account for all of it (within 2%: only the loop's own bookkeeping is outside).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dims = SimpleNamespace(pipe=1, device=torch.device("cpu"))
    m = ThroughputMeter(dims, 64, 1, warmup_steps=3, peak_tflops=None)
    wall_start = None
    for i in range(33):
        if i == 3:
            wall_start = time.perf_counter()
        m.start_step()
        with m.data_wait():
            x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
            time.sleep(0.002)  # a loader that makes the step wait
        for _ in range(4):
            with m.forward():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        opt.zero_grad()
        m.end_step()
        if i % 10 == 9:
            m.collect()  # as at log steps: must not lose or double-count steps
    wall = time.perf_counter() - wall_start
    m.collect()
    assert m.steps_done == 30 and len(m.step_times_s) == 30
    assert sum(m.step_times_s) == pytest.approx(wall, rel=0.02)
    assert m.elapsed_s == pytest.approx(sum(m.step_times_s))
    assert 0 < m.data_wait_s < m.elapsed_s and 0 < m.forward_s < m.elapsed_s


class _DeviceClock:
    """A device whose queued work finishes later than the host queues it: an event records the
    time the stream reaches it, ``queued`` seconds of work after the previous one."""

    def __init__(self):
        self.now, self.syncs = 0.0, 0

    def event_class(self):
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None

            def record(self):
                self.t = clock.now

            def synchronize(self):
                clock.syncs += 1

            def elapsed_time(self, end):  # milliseconds, as torch's
                return (end.t - self.t) * 1e3

        return Event


def test_on_a_gpu_steps_are_timed_by_events_read_at_log_steps(monkeypatch):
    # Each step queues 2 s of device work; the host returns at once (as with asynchronous CUDA kernels).
    # The events time the device's 2 s per step, and only collect() waits (once, on the last event).
    clock = _DeviceClock()
    monkeypatch.setattr(torch.cuda, "Event", clock.event_class())
    dims = SimpleNamespace(pipe=1, device=SimpleNamespace(type="cuda"))
    m = ThroughputMeter(dims, 64, 1, warmup_steps=1, peak_tflops=None)
    for step in range(5):
        m.start_step()
        clock.now += 0.5 if step == 0 else 2.0  # the step's work, done on the device later
        m.end_step()
        clock.now += 0.25  # between steps (a checkpoint's device work): in no step
    assert clock.syncs == 0 and m.step_times_s == []  # no synchronisation in the steps
    m.collect()
    assert clock.syncs == 1
    assert m.step_times_s == pytest.approx([2.0] * 4) and m.elapsed_s == pytest.approx(8.0)  # warm-up left out
