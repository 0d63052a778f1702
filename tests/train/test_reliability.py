"""Issue 9: exact resume, atomic checkpoints, fail fast on a lost rank, stop signals (issue 19: at the
next step boundary), NaN steps, disk faults, tar safety.

Distributed tests pay for launches (15-30 s each on 2 cores): one deepspeed launch trains
every exact-resume pair (data 2 and pipe 2, on the fly and from shards) and the layout
change; the fault drills start their ranks as separate processes, as ``srun`` does, so
that no launcher kills the job for us: what ends it is vitscale's own watchdog.
"""
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import ROOT, TINY, free_port, launch_layouts, read_metrics, run_in_gloo
from vitscale.data import shards as sh
from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic_loader import ShardStream
from vitscale.distributed import EXIT_LOST_RANK, EXIT_NUMERIC, EXIT_TERMINATED
from vitscale.train import checkpoint
from vitscale.train.faults import NumericFault, check_skip_decision, child_signals_deferred, report_bad_step

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# A 2-block tiny ViT (pipe 2 still splits it), 4 micro-batches of 4 per step on 2 ranks.
COMMON = ["model.depth=2", "data.source=gratings", "data.image_size=32", "train.micro_batch=4",
          "train.global_batch=16", "log.every=1", "log.progress=false", "checkpoint.at_end=false",
          "data.num_workers=1", "train.precision=fp32", "optim.warmup_steps=2", "train.lr=2e-3",
          "optim.schedule=constant"]  # a first half of fewer steps has the same schedule as the whole run
STEPS, HALF = 8, 4


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


# --------------------------------------------------------------------------- exact resume (one launch)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    spec = sh.DatasetSpec(generator="gratings", classes=10, instances=8, seed=3, image_size=32, shard_size=20)
    shards = root / "shards"
    sh.prepare_out_dir(spec, shards)
    sh.write_shards(partial(create_generator, spec.generator, spec.classes, spec.image_size, spec.seed), spec, shards,
                    sh.claim_shards(spec, shards), 1)
    sh.finish_dataset(spec, shards)
    kinds = {"d2": [], "p2": ["parallel.pipe=2"], "shards": [f"data.shards={shards}", "data.shuffle_buffer=8"],
             "ema": ["train.ema=0.8", "checkpoint.at_end=true"],
             # 2:4 sparsity under tensor 2, its masks set from the weights after 2 dense steps: a resume that
             # did not restore them from the checkpoint would rank post-step weights and prune others.
             "nm": ["model.sparsity.pattern=2:4", "model.sparsity.dense_warmup=2", "parallel.tensor=2"]}
    layouts = {}
    for name, extra in kinds.items():
        layouts[name] = extra + [f"train.steps={STEPS}"]
        layouts[f"{name}_half"] = extra + [f"train.steps={HALF}", f"checkpoint.every={HALF}"]
        layouts[f"{name}_resumed"] = extra + [f"train.steps={STEPS}", f"run.dir={root}/{name}_half",
                                              "checkpoint.resume=auto"]
    # Layout change: data 2's checkpoint at step HALF, resumed as tensor 2 (weights and schedule).
    layouts["to_tensor2"] = ["parallel.tensor=2", f"train.steps={HALF + 1}", "checkpoint.reshard=weights",
                             f"checkpoint.resume={root}/d2_half/checkpoints/step{HALF:08d}"]
    layouts["to_pipe1"] = [f"train.steps={HALF + 1}", "checkpoint.reshard=weights",  # pipe 2 -> pipe 1 (data 2)
                           f"checkpoint.resume={root}/p2_half/checkpoints/step{HALF:08d}"]
    launch_layouts(root, 2, layouts, COMMON)
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["d2", "p2", "shards", "ema", "nm"])
def test_stop_and_resume_gives_bitwise_the_losses_of_a_straight_run(resumed_runs, kind):
    straight, resumed = _losses(resumed_runs / kind), _losses(resumed_runs / f"{kind}_half")
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(HALF + 1, STEPS + 1)] == [straight[s] for s in range(HALF + 1, STEPS + 1)]
    assert len({straight[s] for s in straight}) > 1  # the model trains: the comparison is not trivially equal


@pytest.mark.distributed
def test_sparsity_masks_are_checkpointed_sharded_like_their_weights(resumed_runs):
    """Each tensor rank's client state holds its slice of every mask: the row-parallel fc2 (192 x 768
    whole) keeps half its input columns per rank, with exactly 2 of every 4 kept."""
    folder = checkpoint.checkpoint_root(resumed_runs / "nm_half") / f"step{HALF:08d}"
    masks = checkpoint.client_state(folder)["sparsity_masks"]["masks"]
    assert len(masks) == 4 * 2  # qkv, proj, fc1, fc2 of 2 blocks
    fc2 = masks["blocks.0.mlp.fc2"]
    assert tuple(fc2.shape) == (192, 384) and fc2.dtype == torch.bool
    assert (fc2.reshape(192, -1, 4).sum(-1) == 2).all()


@pytest.mark.distributed
def test_the_weight_ema_resumes_exactly(resumed_runs):
    """train.ema: the checkpoint carries the EMA, so the resumed run ends with the EMA of the
    straight run, bit for bit (an EMA restarted from the resumed weights would not)."""
    def ema(run: str, step: int) -> dict:
        folder = checkpoint.checkpoint_root(resumed_runs / run) / f"step{step:08d}"
        return checkpoint.client_state(folder)["ema"]

    straight, resumed, half = ema("ema", STEPS), ema("ema_half", STEPS), ema("ema_half", HALF)
    assert straight.keys() == resumed.keys() and "head.weight" in straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert not torch.equal(straight["head.weight"], half["head.weight"])  # the EMA moved after the resume


@pytest.mark.distributed
@pytest.mark.parametrize("changed, original", [("to_tensor2", "d2"), ("to_pipe1", "p2")])
def test_resume_in_another_layout_continues_the_function(resumed_runs, changed, original):
    """data 2 -> tensor 2, pipe 2 -> pipe 1: the first resumed loss is the loss the original
    layout had at that step."""
    first = _losses(resumed_runs / changed)
    assert sorted(first) == [HALF + 1]
    assert first[HALF + 1] == pytest.approx(_losses(resumed_runs / original)[HALF + 1], rel=1e-5, abs=1e-6)
    lrs = {r["step"]: r["lr"] for r in read_metrics(resumed_runs / changed) if r["kind"] == "train"}
    assert lrs[HALF + 1] == pytest.approx(2e-3)  # the schedule continued past its warm-up


# --------------------------------------------------------------------------- a bad step is skipped (one launch)

NAN_STEP, INF_STEP, SKIP_STEPS = 3, 5, 6  # NaN inputs on every rank at 3; an Inf loss on rank 1 only at 5
SKIP_PROBE = "tests.train.test_reliability:train_watching_steps"
SKIP_LAYOUTS = {
    "fp32_zero0": ["parallel.zero=0"],  # a plain optimizer: vitscale's skip (train/faults.py)
    "fp32_zero1": ["parallel.zero=1"],  # DeepSpeed's ZeRO optimizer skips on a NaN / Inf norm
    "bf16_zero1": ["parallel.zero=1", "train.precision=bf16"],  # DeepSpeed's BF16_Optimizer
    "pipe2": ["parallel.pipe=2", "parallel.zero=0"],  # fp32 ZeRO-0 stages, our clipping (optim.clip_in_step)
}


def _optimizer_state(engine) -> list[torch.Tensor]:
    """Everything an optimizer step changes on this rank: the model's weights, the weights the
    optimizer updates (DeepSpeed's fp32 master partitions, or the weights themselves) and its
    state (Adam's moments and step counts), as copies."""
    basic = engine.basic_optimizer
    tensors = list(engine.module.parameters()) + [p for g in basic.param_groups for p in g["params"]]
    for state in basic.state_dict()["state"].values():
        tensors += [v if torch.is_tensor(v) else torch.tensor(v) for _, v in sorted(state.items())]
    return [t.detach().clone() for t in tensors]


def train_watching_steps(run) -> None:
    """Train ``run`` (tests/train/layouts.py calls this on every rank) while recording, for each
    step, whether it left the optimizer's state bit for bit as it was, and how far the LR schedule
    moved; at step INF_STEP the loss of global rank 1 becomes Inf while every gradient stays
    finite (a loss a NaN check on gradients alone would let through). Written to
    ``run.dir/steps_rank{R}.json``, with the NumericFault that stopped the run, if one did (every
    rank raises it at the same step; the launch goes on with the next layout)."""
    from vitscale.train.loop import train

    engine, steps, loss = run.engine, run.steps, run.objective.loss
    seen = {}

    def loss_inf_on_rank1(*args):
        value = loss(*args)
        return value + float("inf") if engine.global_steps + 1 == INF_STEP and run.dims.rank == 1 else value

    run.objective.loss = loss_inf_on_rank1  # inside the objective: a pipeline's last stage calls it too
    train_batch = steps.train_batch

    def watched(batches, measure_norm):
        step, before, scheduled = engine.global_steps + 1, _optimizer_state(engine), engine.lr_scheduler.last_epoch
        result = train_batch(batches, measure_norm)
        after = _optimizer_state(engine)
        seen[step] = {"unchanged": len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)),
                      "lr_steps": engine.lr_scheduler.last_epoch - scheduled, "applied": engine.was_step_applied()}
        return result

    steps.train_batch = watched
    try:
        train(run)
        fault = None
    except NumericFault as stop:
        fault = str(stop)
    (Path(run.cfg.run.dir) / f"steps_rank{run.dims.rank}.json").write_text(json.dumps({"steps": seen, "fault": fault}))


@pytest.fixture(scope="module")
def skipped_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("skip")
    layouts = {name: {"overrides": overrides, "call": SKIP_PROBE} for name, overrides in SKIP_LAYOUTS.items()}
    launch_layouts(root, 2, layouts, COMMON + [f"train.steps={SKIP_STEPS}", "checkpoint.every=1"],
                   env={"VITSCALE_FAULT_NAN_STEP": str(NAN_STEP)})
    return root


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(SKIP_LAYOUTS))
def test_a_bad_step_is_skipped_on_every_rank_and_training_goes_on(skipped_runs, layout):
    """A NaN step (inputs NaN on every rank) and an Inf loss on one rank only (its gradients
    finite) are each skipped on every rank: the weights, master weights and optimizer state are
    bit for bit those of the step before, the LR schedule stays (DeepSpeed's rule for a skipped
    step, train/faults.py), no checkpoint of them is written, and training goes on with finite
    losses; the steps around them change the weights."""
    run = skipped_runs / layout
    records = [json.loads((run / f"steps_rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["fault"] for r in records] == [None, None]  # the run finished
    losses = _losses(run)
    assert sorted(losses) == list(range(1, SKIP_STEPS + 1))
    bad = {NAN_STEP, INF_STEP}
    assert all(math.isfinite(losses[s]) for s in losses if s not in bad), losses
    assert not math.isfinite(losses[NAN_STEP]) and not math.isfinite(losses[INF_STEP]), losses
    skipped = {r["step"] for r in read_metrics(run) if r["kind"] == "train" and r["skipped"]}
    assert skipped == bad
    for rank, record in enumerate(records):
        seen = {int(s): v for s, v in record["steps"].items()}
        for step in bad:
            assert seen[step] == {"unchanged": True, "lr_steps": 0, "applied": False}, (rank, step, seen[step])
        for step in set(seen) - bad:
            assert seen[step] == {"unchanged": False, "lr_steps": 1, "applied": True}, (rank, step, seen[step])
    root = checkpoint.checkpoint_root(run)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000004", "step00000006"]  # keep 2
    assert not (root / f"step{NAN_STEP:08d}").exists() and not (root / f"step{INF_STEP:08d}").exists()


def test_a_nonfinite_loss_makes_its_gradients_nan_and_leaves_finite_ones_bit_for_bit():
    from vitscale.train.faults import nonfinite_spreads

    w = torch.tensor([0.3, -1.7], requires_grad=True)
    for scale in (1.0, 1.0e30):  # finite: the value and the gradient are those of the loss itself
        loss = (w * w).sum() * scale
        (plain,) = torch.autograd.grad(loss, w, retain_graph=True)
        spread = nonfinite_spreads(loss)
        assert torch.equal(spread, loss) and torch.equal(torch.autograd.grad(spread, w)[0], plain)
    loss = (w * w).sum() + float("inf")  # an Inf loss with finite gradients
    assert torch.isfinite(torch.autograd.grad(loss, w, retain_graph=True)[0]).all()
    assert torch.isnan(torch.autograd.grad(nonfinite_spreads(loss), w)[0]).all()


# --------------------------------------------------------------------------- checkpoint files (no launch)


def _complete(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / checkpoint.MARKER).write_text(json.dumps({"step": step}))
    return folder


def test_resume_auto_ignores_a_half_written_checkpoint(tmp_path):
    root = checkpoint.checkpoint_root(tmp_path)
    good = _complete(root / "step00000005", 5)
    (root / "step00000010").mkdir()  # a save that died: DeepSpeed's files, no marker
    (root / "step00000010" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (root / "latest").write_text("step00000010")  # even where `latest` already points at it
    assert checkpoint.find_resume(tmp_path, "auto") == good
    assert checkpoint.find_resume(tmp_path, str(root)) == good
    with pytest.raises(ValueError, match=r"step00000010 is incomplete .* resume from .*step00000005"):
        checkpoint.find_resume(tmp_path, str(root / "step00000010"))
    assert checkpoint.find_resume(tmp_path / "fresh", "auto") is None
    assert checkpoint.find_resume(tmp_path, "never") is None


def test_a_layout_change_is_refused_before_start_unless_resharding_is_asked_for(tmp_path):
    from vitscale.experiment import load_experiment as load
    from vitscale.train.reshard import check_resume

    folder = _complete(checkpoint.checkpoint_root(tmp_path) / "step00000004", 4)
    data2 = {"pipe": 1, "tensor": 1, "data": 2, "zero": 1}
    (folder / checkpoint.MARKER).write_text(json.dumps({"step": 4, "samples": 64, "layout": data2}))
    tensor2 = {**data2, "tensor": 2, "data": 1}
    exp = load(TINY, [f"run.dir={tmp_path}"])
    check_resume(exp, data2)  # the same layout
    with pytest.raises(ValueError, match=r"another layout \(tensor 1 -> 2, data 2 -> 1\): set checkpoint.reshard=weights"):
        check_resume(exp, tensor2)
    check_resume(load(TINY, [f"run.dir={tmp_path}", "checkpoint.reshard=weights"]), tensor2)
    zero3 = load(TINY, [f"run.dir={tmp_path}", "checkpoint.reshard=weights", "parallel.zero=3"])
    with pytest.raises(ValueError, match=r"reshard=weights into parallel.zero=3 is not supported"):
        check_resume(zero3, {**tensor2, "zero": 3})


class FakeEngine:
    """What ``checkpoint.save`` uses of a DeepSpeed engine; ``fail`` makes the next save raise
    the error a full disk gives, after writing part of its files."""

    def __init__(self):
        self.module, self.device, self.fail = nn.Linear(2, 2), torch.device("cpu"), False
        self.optimizer = None  # an fp32 ZeRO-0 run's: the module holds the master weights

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if self.fail:
            raise OSError(28, "No space left on device")


def _save_faults(rank, world):
    import tempfile

    run_dir, engine = Path(tempfile.mkdtemp()), FakeEngine()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("vitscale.train.checkpoint").addHandler(handler)
    save = partial(checkpoint.save, engine, run_dir, samples=0, keep=2, is_main=True, layout={"data": 1})
    for step in (2, 4, 6):
        assert save(step) == checkpoint.checkpoint_root(run_dir) / f"step{step:08d}"
    root = checkpoint.checkpoint_root(run_dir)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000004", "step00000006"]  # keep 2
    assert (root / "latest").read_text() == "step00000006"
    assert (root / "step00000006" / "rng_rank00000.pt").is_file()

    engine.fail = True  # disk full at step 8: the folder goes, step 6 stays the one to resume from
    assert save(8) is None
    assert not (root / "step00000008").exists() and (root / "latest").read_text() == "step00000006"
    assert checkpoint.find_resume(run_dir, "auto") == root / "step00000006"
    failed = [r.getMessage() for r in records if "FAILED" in r.getMessage()]
    assert failed and "No space left" in failed[0] and "step00000006 stays the latest complete" in failed[0]

    engine.fail = False
    with torch.no_grad():
        engine.module.weight[0, 0] = float("nan")
    assert save(10) is None and not (root / "step00000010").exists()  # never a NaN checkpoint
    assert any("NaN" in r.getMessage() for r in records)


def test_failed_or_nan_saves_keep_the_previous_checkpoint_and_keep_last_k():
    run_in_gloo(_save_faults, 1)


def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(checkpoint._rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint._set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and (want[1] == got[1]).all() and want[2] == got[2]


def test_bad_steps_stop_bf16_but_not_fp16():
    for in_a_row in range(1, 10):
        report_bad_step(in_a_row, in_a_row, "fp16", 3, True)  # fp16's loss scaler skips, never a stop
    report_bad_step(5, 2, "bf16", 3, True)
    with pytest.raises(NumericFault, match=r"NaN / Inf for 3 step\(s\) in a row \(train.max_bad_steps=3"):
        report_bad_step(6, 3, "bf16", 3, True)
    with pytest.raises(NumericFault, match=r"step 7: the gradient norm was NaN / Inf for 3 step\(s\) in a row"):
        report_bad_step(7, 3, "fp32", 3, True, "gradient norm")
    check_skip_decision(8, loss_bad=True, any_skipped=True, any_applied=False)  # a bad step, skipped everywhere
    check_skip_decision(8, loss_bad=False, any_skipped=False, any_applied=True)
    with pytest.raises(NumericFault, match=r"step 8: some ranks skipped the optimizer step and others applied it"):
        check_skip_decision(8, loss_bad=True, any_skipped=True, any_applied=True)
    with pytest.raises(NumericFault, match=r"step 9: the loss was NaN / Inf but the optimizer step was applied"):
        check_skip_decision(9, loss_bad=True, any_skipped=False, any_applied=True)


def test_a_loader_workers_death_raises_only_after_the_checkpoint_collectives():
    """torch's DataLoader raises from its SIGCHLD handler wherever the main thread is; inside a
    save it would split the ranks' collectives (a hang). Deferred, it raises after the block."""
    def worker_died(signum, frame):  # what torch's handler does when a worker was killed
        raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Killed.")

    previous = signal.signal(signal.SIGCHLD, worker_died)
    try:
        steps = []
        with pytest.raises(RuntimeError, match="is killed by signal"):
            with child_signals_deferred():
                os.kill(os.getpid(), signal.SIGCHLD)  # the worker dies mid-save
                time.sleep(0.05)  # a signal handler would have run by now
                steps.append("the rest of the save ran")
        assert steps == ["the rest of the save ran"]
        assert signal.getsignal(signal.SIGCHLD) is worker_died  # restored
        with child_signals_deferred():  # no signal: nothing raised
            pass
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_a_tar_member_with_a_dotdot_or_absolute_path_is_refused(tmp_path):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for bad in ("../000000_0000000.png", "/etc/000000_0000000.png"):
        shard = tmp_path / "shard-000000.tar"
        with tarfile.open(shard, "w") as tar:
            for name, data in ((bad, png.getvalue()), (bad.replace(".png", ".cls"), b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with pytest.raises(ValueError, match=r"member '.*' has an absolute or '\.\.' path; refusing the shard"):
            next(iter(ShardStream([str(shard)], 8, 1, 0, 0, 1, shuffle_buffer=0)))


# --------------------------------------------------------------------------- fault drills (separate ranks)


def _start_ranks(run_dir: Path, overrides: list[str], world: int = 2, env: dict | None = None) -> list:
    """``world`` ranks of ``vitscale.train`` as separate processes (as srun starts them): no
    launcher watches them, so nothing but vitscale ends the job when one dies."""
    port, procs = str(free_port()), []
    run_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        rank_env = {**ENV, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        log = open(run_dir / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "vitscale.train", TINY, f"run.dir={run_dir}", *COMMON,
                                       *overrides], env=rank_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _wait_for_step(run_dir: Path, step: int, procs: list, timeout: float = 240, after: int = 0) -> None:
    """Until a train record (past the first ``after`` records) reaches ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(r["kind"] == "train" and r["step"] >= step for r in read_metrics(run_dir)[after:]):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended early: {_logs(run_dir)}")
        time.sleep(0.3)
    raise AssertionError(f"no train record for step {step} within {timeout} s: {_logs(run_dir)}")


def _logs(run_dir: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(run_dir.glob("rank*.log")))


def _wait(procs: list, timeout: float) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # only the process groups this test started


HEARTBEAT_S = 8  # the bound the kill drill asserts: heartbeat + one beat + slack for a loaded machine
BOUND_S = HEARTBEAT_S + 20


@pytest.mark.distributed
def test_kill_9_of_a_rank_ends_the_job_naming_it_and_resume_continues(tmp_path):
    run = ["train.steps=100000", "checkpoint.every=2", f"parallel.heartbeat_s={HEARTBEAT_S}", "parallel.timeout_s=60"]
    procs = _start_ranks(tmp_path, run)
    _wait_for_step(tmp_path, 3, procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    code = _wait(procs[:1], timeout=BOUND_S + 30)[0]
    took = time.time() - t0
    out = (tmp_path / "rank0.log").read_text()
    assert code == EXIT_LOST_RANK, out[-3000:]
    assert took <= BOUND_S, f"rank 0 ended {took:.1f} s after the kill (bound {BOUND_S} s)"
    print(f"kill -9 of rank 1: rank 0 ended {took:.1f} s later (bound {BOUND_S} s)")
    assert "lost rank 1 (node 0, host " in out, out[-3000:]
    last = checkpoint.find_resume(tmp_path, "auto")
    assert last is not None
    done = checkpoint.read_marker(last)["step"]

    # SLURM resubmits the same job: resume=auto continues from the last complete checkpoint; SIGTERM
    # (the time limit) then stops it with a checkpoint and the documented exit code.
    before = len(read_metrics(tmp_path))
    procs = _start_ranks(tmp_path, run)
    _wait_for_step(tmp_path, done + 2, procs, after=before)
    resumed = [r["step"] for r in read_metrics(tmp_path)[before:] if r["kind"] == "train"]
    assert resumed[:2] == [done + 1, done + 2]  # straight on from the checkpoint's step
    for p in procs:  # SLURM signals every task
        os.killpg(p.pid, signal.SIGTERM)
    codes = _wait(procs, timeout=120)
    out = _logs(tmp_path)
    assert codes == [EXIT_TERMINATED] * 2, out
    stopped = checkpoint.find_resume(tmp_path, "auto")
    assert "stopped at step" in out and "SIGTERM" in out
    assert checkpoint.read_marker(stopped)["step"] > done + 1


USR1_LOG_EVERY = 50  # the old rule stopped at the next log interval: step 50 here


@pytest.mark.distributed
def test_usr1_on_one_rank_stops_every_rank_at_the_next_step_with_a_checkpoint(tmp_path):
    """SLURM's --signal=USR1@120, here on rank 1 only: every rank learns it through the per-step flag
    and stops at the step boundary after it (not at the next log interval), with that step's
    checkpoint complete, exit 0, and a log line saying how long after the signal the checkpoint
    was written and how long before the step's end the signal came."""
    procs = _start_ranks(tmp_path, ["train.steps=100000", f"log.every={USR1_LOG_EVERY}", "checkpoint.every=2"])
    deadline = time.time() + 240
    while (last := checkpoint.find_resume(tmp_path, "auto")) is None and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended early: {_logs(tmp_path)}")
        time.sleep(0.1)
    assert last is not None, _logs(tmp_path)
    before = checkpoint.read_marker(last)["step"]  # the run is past this step when the signal comes
    os.kill(procs[1].pid, signal.SIGUSR1)
    codes = _wait(procs, timeout=120)
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], logs[0][-3000:]
    stopped = [re.findall(r"stopped at step (\d+) on SIGUSR1", log) for log in logs]
    assert stopped[0] and stopped[0] == stopped[1], stopped  # both ranks, the same step
    step = int(stopped[0][0])
    # the step in flight when the signal came (before + 1 .. before + 3), with slack for a busy machine
    assert before < step <= before + 10 < USR1_LOG_EVERY, f"signal after step {before}, stopped at {step}"
    assert checkpoint.read_marker(checkpoint.find_resume(tmp_path, "auto"))["step"] == step
    timing = re.search(rf"stopped at step {step} on SIGUSR1: checkpoint written ([\d.]+) s after SIGUSR1 "
                       r"\(received ([\d.]+) s before the step ended\)", logs[0])
    assert timing, logs[0][-3000:]
    written, lead = map(float, timing.groups())
    assert lead <= written < 60, timing.group(0)
    print(timing.group(0))


@pytest.mark.distributed
def test_losing_rank_0s_host_ends_the_survivors_within_heartbeat_s_naming_it(tmp_path):
    """Rank 0's process frozen (SIGSTOP: its connections stay open and nothing answers, as when
    its node drops off the network; it hosts the job's store): rank 1, waiting in a collective
    and in store calls, retries the store for heartbeat_s, then names rank 0's host and ends
    with EXIT_LOST_RANK, well before the collective's timeout (60 s)."""
    procs = _start_ranks(tmp_path, ["train.steps=100000", f"parallel.heartbeat_s={HEARTBEAT_S}",
                                    "parallel.timeout_s=60"])
    _wait_for_step(tmp_path, 2, procs)
    os.kill(procs[0].pid, signal.SIGSTOP)
    t0 = time.time()
    code = _wait(procs[1:], timeout=BOUND_S + 30)[0]
    took = time.time() - t0
    os.killpg(procs[0].pid, signal.SIGKILL)  # only the process group this test started
    procs[0].wait()
    out = (tmp_path / "rank1.log").read_text()
    print(f"rank 0 frozen: rank 1 ended {took:.1f} s later (bound {BOUND_S} s)")
    assert code == EXIT_LOST_RANK, out[-3000:]
    assert took <= BOUND_S, f"rank 1 ended {took:.1f} s after rank 0 froze (bound {BOUND_S} s)"
    assert re.search(r"lost rank 0 \(node 0, host [^)]+\), which hosts the job's store: no answer for (\d+) s", out), \
        out[-3000:]
    assert "the job's store did not answer" in out  # retried before blaming


HANG_TIMEOUT_S, HANG_HEARTBEAT_S, HANG_STEP = 20, 10, 3
# timeout_s, then the watchdog's grace (two beats of heartbeat_s / 6) and the verdict's two
# beats, plus slack for a loaded machine: far below gloo's 30 minutes, which a group without
# parallel.timeout_s would wait (the test then fails here).
HANG_BOUND_S = HANG_TIMEOUT_S + 25


@pytest.mark.distributed
@pytest.mark.parametrize("place, layout, where", [
    ("tensor", ["parallel.tensor=2"], "inside a tensor-parallel all-reduce"),
    ("grad", [], "inside the data-parallel gradient all-reduce"),  # data 2, ZeRO-1 (the tiny config's)
])
def test_a_rank_that_stops_progressing_in_a_collective_ends_the_job_within_timeout_s_naming_it(
        tmp_path, place, layout, where):
    """VITSCALE_FAULT_HANG_*: rank 1 sleeps (alive, beating) inside a collective of step 3 that
    rank 0 has entered. The group's timeout (parallel.timeout_s, not gloo's 30 minutes) ends rank
    0's wait; the watchdog names rank 1 as the rank that stopped progressing, and both ranks end
    with EXIT_LOST_RANK. The ranks run as separate processes: no launcher ends the job for us."""
    procs = _start_ranks(tmp_path, layout + ["train.steps=100000", f"parallel.timeout_s={HANG_TIMEOUT_S}",
                                             f"parallel.heartbeat_s={HANG_HEARTBEAT_S}"],
                         env={"VITSCALE_FAULT_HANG_STEP": str(HANG_STEP), "VITSCALE_FAULT_HANG_RANK": "1",
                              "VITSCALE_FAULT_HANG_AT": place})
    _wait_for_step(tmp_path, HANG_STEP - 1, procs)
    t0 = time.time()
    try:
        codes = _wait(procs, timeout=HANG_BOUND_S + 60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job was still alive {time.time() - t0:.0f} s after step {HANG_STEP - 1} "
                             f"(parallel.timeout_s={HANG_TIMEOUT_S}): {_logs(tmp_path)}") from None
    took = time.time() - t0
    out = _logs(tmp_path)
    print(f"hang {where}: the job ended {took:.1f} s after step {HANG_STEP - 1} (parallel.timeout_s="
          f"{HANG_TIMEOUT_S}, bound {HANG_BOUND_S} s)")
    assert took <= HANG_BOUND_S, f"the job ended {took:.1f} s after the hang (bound {HANG_BOUND_S} s): {out}"
    assert took >= HANG_TIMEOUT_S - 5, out  # ended by the collective's timeout, not by something sooner
    assert codes == [EXIT_LOST_RANK] * 2, out
    assert f"VITSCALE_FAULT_HANG: rank 1 stops making progress in step {HANG_STEP}, {where}" in out, out
    rank0 = (tmp_path / "rank0.log").read_text()
    assert re.search(rf"all \d+ process groups of rank 0 wait at most parallel.timeout_s={HANG_TIMEOUT_S} s", rank0)
    assert "a collective failed in step 3" in rank0, rank0  # rank 0 was the one waiting
    named = re.findall(r"rank 1 \(node 0, host [^)]+\) stopped progressing in step 3: no step for (\d+) s", out)
    assert named and int(named[0]) >= HANG_TIMEOUT_S, out  # whole seconds: "no step for 20 s" at timeout_s=20
    assert "stopped progressing" in (tmp_path / "rank1.log").read_text()  # the verdict reached rank 1 too


@pytest.mark.distributed
def test_nan_loss_stops_bf16_after_max_bad_steps_without_a_nan_checkpoint(tmp_path):
    procs = _start_ranks(tmp_path, ["train.steps=20", "train.precision=bf16", "checkpoint.every=1",
                                    "train.max_bad_steps=2"], env={"VITSCALE_FAULT_NAN_STEP": "3-9"})
    codes = _wait(procs, timeout=300)
    out = _logs(tmp_path)
    assert codes == [EXIT_NUMERIC] * 2, out[-3000:]
    assert "the loss was NaN / Inf for 2 step(s) in a row (train.max_bad_steps=2" in out
    root = checkpoint.checkpoint_root(tmp_path)
    assert [p.name for p in checkpoint.complete_checkpoints(root)] == ["step00000001", "step00000002"]
    assert not list(root.glob("step0000000[3-9]"))  # no checkpoint of the NaN weights


@pytest.mark.parametrize("override, message", [
    ("parallel.timeout_s=0", r"parallel.timeout_s=0.0 must be > 0 seconds"),
    ("parallel.heartbeat_s=-1", r"parallel.heartbeat_s=-1.0 must be >= 0"),
    ("train.max_bad_steps=0", r"train.max_bad_steps=0 must be >= 1"),
    ("checkpoint.reshard=optimizer", r"checkpoint.reshard='optimizer' is not allowed; choose one of 'error', 'weights'"),
])
def test_reliability_keys_are_validated(override, message):
    from vitscale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])
