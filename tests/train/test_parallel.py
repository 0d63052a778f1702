"""Every layout trains the same function (the central test of the project).

Fixed seed, same global batch, fp32, 4 optimizer steps with gradient clipping active
(the norms are ~8 against a clip of 1, so a wrong tensor- or pipeline-parallel gradient
norm would show): the loss sequence of each layout must match the single-process run
within 1e-5 relative. Three launches cover all layouts: the single-process reference,
one 2-process launch and one 4-process launch that each train several layouts in turn
(tests/train/layouts.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN, ROOT, TINY, free_port, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.seed=3", "train.precision=fp32", "log.every=1", "log.progress=false",
          "model.depth=4", "train.micro_batch=4", "train.global_batch=16", "optim.warmup_steps=2",
          "optim.grad_clip=1.0", "checkpoint.at_end=false", "data.num_workers=0"]

TWO = {
    "data2_zero0": ["parallel.zero=0"],
    "data2_zero1": ["parallel.zero=1"],
    "data2_zero2": ["parallel.zero=2"],
    "data2_zero3": ["parallel.zero=3"],
    "tensor2": ["parallel.tensor=2", "parallel.zero=0"],
    "pipe2": ["parallel.pipe=2", "parallel.zero=0"],
    "pipe2_recompute": ["parallel.pipe=2", "parallel.zero=1", "parallel.activation_checkpoint=1",
                        "log.peak_tflops=1.0"],
}
FOUR = {
    "tensor2_data2_zero1": ["parallel.tensor=2", "parallel.zero=1"],
    "tensor2_data2_zero3": ["parallel.tensor=2", "parallel.zero=3"],
    "pipe2_tensor2": ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1"],
    "pipe2_data2_zero1": ["parallel.pipe=2", "parallel.zero=1", "parallel.partition=parameters"],
    "tensor4": ["parallel.tensor=4", "parallel.zero=1"],
    "pipe4": ["parallel.pipe=4", "parallel.zero=0", "parallel.partition=uniform"],
}


def _launch_layouts(root: Path, nprocs: int, layouts: dict, config: str = TINY, common: list = COMMON) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
           str(ROOT / "tests" / "train" / "layouts.py"), config, str(root), json.dumps(common), json.dumps(layouts)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{nprocs}-process layouts failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    run_training(root / "single", COMMON + ["parallel.zero=0"], launcher="python", nprocs=1)
    _launch_layouts(root, 2, TWO)
    _launch_layouts(root, 4, FOUR)
    return root


@pytest.mark.parametrize("layout", list(TWO) + list(FOUR))
def test_layout_matches_single_process(runs, layout):
    ref = train_losses(runs / "single")
    got = train_losses(runs / layout)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5), f"{layout}: {got} vs single process {ref}"
    assert ref[-1] != ref[0]  # the reference actually trained


@pytest.mark.parametrize("layout", ["data2_zero0", "tensor2", "pipe2", "tensor2_data2_zero1", "pipe2_tensor2", "tensor4", "pipe4"])
def test_gradient_norm_counts_shards_once(runs, layout):
    # Clipping uses this norm; replicated parameters must count once, shards on every rank.
    ref = [r["grad_norm"] for r in read_metrics(runs / "single") if r["kind"] == "train"]
    got = [r["grad_norm"] for r in read_metrics(runs / layout) if r["kind"] == "train"]
    assert min(ref) > 1.0  # clipping is active in this test
    assert got == pytest.approx(ref, rel=1e-4)


def test_records_name_the_layout(runs):
    rows = [r for r in read_metrics(runs / "pipe2_tensor2") if r["kind"] == "throughput" and r["scope"] == "global"]
    assert rows and rows[-1]["layout"] == {"pipe": 2, "tensor": 2, "data": 1, "zero": 1}
    assert rows[-1]["devices"] == 4
    rows = [r for r in read_metrics(runs / "pipe2_recompute") if r["kind"] == "throughput" and r["scope"] == "global"]
    # Recomputation is hardware work, not model work: HFU counts 4 forward passes, MFU 3.
    assert rows[-1]["hfu"] == pytest.approx(rows[-1]["mfu"] * 4 / 3)


# CLIP: the contrastive loss spans the whole global batch in every layout (gathered over
# data ranks, cached over accumulated micro-batches), so data 2 (one micro-batch each) and
# data 1 (two accumulated micro-batches, plain engine or pipeline) train the same function.
CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
CLIP_COMMON = [f"train.steps={STEPS}", "train.seed=3", "train.precision=fp32", "log.every=1", "log.progress=false",
               "train.micro_batch=8", "train.global_batch=16", "optim.warmup_steps=2", "checkpoint.at_end=false",
               "data.num_workers=0"]
CLIP_TWO = {
    "clip_data2_zero1": ["parallel.zero=1"],
    "clip_data2_zero3": ["parallel.zero=3"],
    "clip_tensor2": ["parallel.tensor=2", "parallel.zero=1"],
    "clip_pipe2": ["parallel.pipe=2", "parallel.zero=1"],
}
CLIP_FOUR = {
    "clip_pipe2_tensor2": ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1"],
    "clip_tensor2_data2": ["parallel.tensor=2", "parallel.zero=1"],
}


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_layouts")
    run_training(root / "single", CLIP_COMMON + ["parallel.zero=0"], launcher="python", nprocs=1, config=CLIP_TINY)
    _launch_layouts(root, 2, CLIP_TWO, CLIP_TINY, CLIP_COMMON)
    _launch_layouts(root, 4, CLIP_FOUR, CLIP_TINY, CLIP_COMMON)
    return root


@pytest.mark.parametrize("layout", list(CLIP_TWO) + list(CLIP_FOUR))
def test_clip_layout_matches_single_process(clip_runs, layout):
    ref = train_losses(clip_runs / "single")
    got = train_losses(clip_runs / layout)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5), f"{layout}: {got} vs single process {ref}"
    assert ref[-1] < ref[0]  # the reference trained
    rows = [r for r in read_metrics(clip_runs / layout) if r["kind"] == "throughput" and r["scope"] == "global"]
    assert rows and rows[-1]["tflops_per_device"] > 0  # CLIP FLOPs are counted too
