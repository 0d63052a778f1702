"""End-to-end training on CPU with 2 processes (gloo).

One launch (tests/train/layouts.py) trains the four ZeRO stages and a resumed run, which cover: the
loss falls on the learnable task, the four loss sequences agree within fp32 round-off, the throughput
records are complete and consistent, and (ZeRO-3) a mid-run checkpoint resumes into the identical
trajectory. Launches are the expensive part (13-18 s each), so each one is asserted on many ways.
"""
import json

import pytest
import yaml

from tests.conftest import TINY, launch_layouts, read_metrics, train_losses

pytestmark = pytest.mark.distributed

STEPS = 40
# A 4-block variant of the tiny config keeps each run to a few seconds of compute.
# Gratings: a task a 4-block ViT learns within 40 steps (FractalDB, the default, takes longer).
COMMON = [f"train.steps={STEPS}", "log.every=1", "model.depth=4", "data.source=gratings", "optim.warmup_steps=5",
          "train.lr=2e-3", "train.micro_batch=8", "train.global_batch=32", "checkpoint.at_end=false", "data.num_workers=1"]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """The four ZeRO stages, then a run resumed from the ZeRO-3 run's step-30 checkpoint, in one launch."""
    root = tmp_path_factory.mktemp("zero")
    layouts = {f"zero{stage}": [f"parallel.zero={stage}"] for stage in (0, 1, 2)}
    layouts["zero3"] = ["parallel.zero=3", "checkpoint.every=10", "checkpoint.keep=2"]
    layouts["zero3_resumed"] = ["parallel.zero=3", f"checkpoint.resume={root / 'zero3' / 'checkpoints' / 'step00000030'}"]
    launch_layouts(root, 2, layouts, COMMON + ["log.progress=false"], TINY)
    return {stage: root / f"zero{stage}" for stage in (0, 1, 2, 3)}


def test_loss_falls_on_the_synthetic_task(zero_runs):
    for stage, run_dir in zero_runs.items():
        losses = train_losses(run_dir)
        assert len(losses) == STEPS
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, f"ZeRO-{stage}: loss {first:.3f} -> {last:.3f}"


def test_zero_stages_match_within_fp32_roundoff(zero_runs):
    ref = train_losses(zero_runs[0])[:5]
    for stage in (1, 2, 3):
        got = train_losses(zero_runs[stage])[:5]
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), f"ZeRO-{stage} {got} vs ZeRO-0 {ref}"


def test_train_records_have_lr_and_grad_norm(zero_runs):
    for stage, run_dir in zero_runs.items():
        rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows), f"ZeRO-{stage}"
        lrs = [r["lr"] for r in rows]
        assert lrs[:5] == pytest.approx([4e-4, 8e-4, 1.2e-3, 1.6e-3, 2e-3])  # linear warm-up to step 5
        assert max(lrs) == pytest.approx(2e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    norms0 = [r["grad_norm"] for r in read_metrics(zero_runs[0]) if r["kind"] == "train"][:3]
    norms2 = [r["grad_norm"] for r in read_metrics(zero_runs[2]) if r["kind"] == "train"][:3]
    assert norms0 == pytest.approx(norms2, rel=1e-4)


def test_throughput_records_are_complete_and_consistent(zero_runs):
    rows = read_metrics(zero_runs[1])
    glob = [r for r in rows if r["kind"] == "throughput" and r["scope"] == "global"]
    node = [r for r in rows if r["kind"] == "throughput" and r["scope"] == "node"]
    assert glob and len(node) == len(glob)  # one node here
    fields = {"step", "samples", "elapsed", "samples_per_s", "samples_per_s_per_device", "tflops_per_device",
              "mfu", "node", "nodes", "devices", "layout", "model", "micro_batch", "global_batch",
              "data_wait_fraction"}
    for r in glob + node:
        assert fields <= set(r), fields - set(r)
        assert r["samples"] == r["step"] * 32
        assert r["samples_per_s"] == pytest.approx(r["measured_samples"] / r["elapsed"], rel=1e-9)
        assert r["samples_per_s_per_device"] == pytest.approx(r["samples_per_s"] / r["devices"])
        assert 0.0 <= r["data_wait_fraction"] < 1.0
        assert r["tflops_per_device"] > 0 and r["mfu"] is None  # no known peak on CPU
        assert r["layout"] == {"pipe": 1, "tensor": 1, "data": 2, "zero": 1}
    last = glob[-1]
    assert last["devices"] == 2 and last["nodes"] == 1 and last["measured_steps"] == STEPS - 2  # 2 warm-up steps
    assert node[-1]["hostname"] and node[-1]["samples"] == last["samples"]


def test_run_folder_holds_resolved_configs(zero_runs):
    run_dir = zero_runs[2]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert cfg["parallel"]["zero"] == 2 and cfg["train"]["steps"] == STEPS
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 32
    assert ds["gradient_accumulation_steps"] == 2  # 32 / (8 x 2 ranks)


def test_resume_continues_the_same_trajectory(zero_runs):
    """ZeRO-3 checkpoints every 10 steps, 2 kept -> a new run from step 30 reproduces steps 31-40."""
    root = zero_runs[3] / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == ["step00000030", "step00000040"]
    assert (root / "latest").read_text().strip() == "step00000040"
    resumed = [r for r in read_metrics(zero_runs[3].parent / "zero3_resumed") if r["kind"] == "train"]
    assert [r["step"] for r in resumed] == list(range(31, STEPS + 1))
    full = train_losses(zero_runs[3])[30:]
    assert [r["loss"] for r in resumed] == pytest.approx(full, rel=1e-5, abs=1e-6)
