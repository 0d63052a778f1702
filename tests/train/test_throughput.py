"""Throughput records from handmade per-rank timings: MFU / HFU arithmetic on a known case,
per-node figures, straggler naming and warning (no process group)."""
import logging
from types import SimpleNamespace

import pytest
import torch

from vitscale.train.throughput import ThroughputMeter


def meter(node_of_rank, hosts, global_batch=1024, flops=35e9, peak=312.0, recompute=False, fraction=0.8,
          steps=10, pipe_tensor=1):
    world = len(node_of_rank)
    dims = SimpleNamespace(world_size=world, data=world // pipe_tensor, num_nodes=len(hosts), node=0,
                           node_of_rank=node_of_rank, node_hosts=hosts, device=torch.device("cpu"), is_main=True)
    m = ThroughputMeter(dims, global_batch, int(flops), warmup_steps=2, peak_tflops=peak, recompute=recompute,
                        straggler_fraction=fraction)
    m.steps_done = steps
    return m


# 8 ranks on 2 nodes, 10 timed steps of batch 1024 in 10 s: rows are [elapsed_s, data_wait_s, data_rank, forward_s].
TABLE = [[10.0, 1.0, r, 2.0] for r in range(4)] + [[10.0, 3.0, r, 4.0] for r in range(4, 8)]


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
    table = [[4.0, 0.0, 0, 1.0], [4.0, 0.0, 0, 1.0], [4.0, 0.0, 1, 1.0], [4.0, 0.0, 1, 1.0],
             [4.0, 0.0, 2, 1.6], [4.0, 0.0, 2, 1.6]]
    recs = meter([0, 0, 1, 1, 2, 2], ["a", "b", "c"], global_batch=768, steps=4, pipe_tensor=2).build_records(4, table)
    assert [r["samples_per_s"] for r in recs[1:]] == pytest.approx([256.0] * 3)
    assert [r["fwd_samples_per_s"] for r in recs[1:]] == pytest.approx([1024.0, 1024.0, 640.0])
    assert recs[0]["stragglers"] == ["c"] and recs[0]["node_spread"] == pytest.approx(384 / 1024)


def test_without_forward_timings_the_pace_is_samples_per_s():
    table = [[10.0, 0.0, 0, 0.0], [20.0, 0.0, 1, 0.0]]  # a pipeline: no forward of its own is timed
    glob, a, b = meter([0, 1], ["a", "b"], global_batch=64, steps=10).build_records(10, table)
    assert glob["straggler_basis"] == "samples_per_s" and a["fwd_samples_per_s"] is None
    assert (a["samples_per_s"], b["samples_per_s"]) == pytest.approx((32.0, 16.0))
    assert glob["samples_per_s"] == pytest.approx(32.0) and glob["slowest_host"] == "b"
