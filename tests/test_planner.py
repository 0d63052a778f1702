"""The layout planner (issue 23) against references it does not compute itself: parameter counts of
the built torch module, the ZeRO paper's bytes per parameter worked by hand, the tensors autograd
actually saves, and the repository's own layout rules."""
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from tests.conftest import ROOT, TINY
from vitscale.experiment import load_experiment
from vitscale.planner import GIB, machine_for, model_shape, plan_layout

VIT_22B = str(ROOT / "configs" / "vit_22b.yaml")


@pytest.fixture(scope="module")
def tiny():
    exp = load_experiment(TINY, ["train.global_batch=64"])
    return exp, model_shape(exp)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_memory_matches_the_zero_papers_bytes_per_parameter(precision):
    exp = load_experiment(TINY, [f"train.precision={precision}", "parallel.zero=1", "train.global_batch=64"])
    params = sum(p.numel() for p in exp.model.create().parameters())  # the torch module, not the planner
    shape, d = model_shape(exp), 4
    for zero in range(4):
        plan = plan_layout(exp, machine_for("a100", d, d, 80), shape, 1, 1, zero, "none", False, 16)
        # by hand: weights 4 B (fp32) or 2 B (bf16); fp32 gradient accumulation 4 B (bf16 too: our
        # DeepSpeed config; fp32 ZeRO-1 also keeps its partition's fp32 gradient); Adam's two moments
        # 8 B, plus an fp32 master 4 B under ZeRO (ZeRO's K = 12; DeepSpeed clones one from fp32 weights too)
        weight = 4 if precision == "fp32" else 2
        optimizer = 8 if precision == "fp32" and zero == 0 else 12
        grads = params * 4 / (d if zero >= 2 else 1) + (params * 4 / d if zero == 1 and precision == "fp32" else 0)
        expect = {"params": params * weight / (d if zero == 3 else 1), "grads": grads,
                  "optimizer": params * optimizer / (d if zero >= 1 else 1)}
        for column, value in expect.items():
            assert plan.memory[column] * GIB == pytest.approx(value, rel=1e-9), (zero, column)


def test_tensor_parallel_parameters_match_the_split_module(tiny):
    from vitscale.models.tensor_parallel import parallelize_vit

    exp, shape = tiny
    model = exp.model.create()
    parallelize_vit(model, 0, 2, None)  # this rank's shard of the real module
    kept = sum(p.numel() for p in model.parameters())
    plan = plan_layout(exp, machine_for("a100", 2, 2, 80), shape, 1, 2, 0, "none", False, 16)
    assert plan.memory["params"] * GIB / 4 == pytest.approx(kept, rel=1e-9)


def test_activation_memory_is_near_what_autograd_saves(tiny):
    """One block's saved activations (deduplicated by storage, weights left out), counted by autograd's
    hooks, against the planner's Korthikanti estimate for the same block with a fused attention kernel
    (torch's SDPA keeps no scores; the tiny ViT has no dropout masks, which the estimate counts: within 30%)."""
    exp, shape = tiny
    model = exp.model.create().train()
    block, b = model.blocks[0], 16
    x = torch.randn(b, exp.model.arch.seq_len, exp.model.arch.embed_dim, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}  # saved too, but not activations
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    measured = sum(seen.values())
    plan = plan_layout(exp, machine_for("a100", 1, 1, 80), shape, 1, 1, 1, "none", False, b)
    blocks = exp.model.arch.depth
    predicted = (plan.memory["activations"] * GIB) / blocks
    assert 0.7 < predicted / measured < 1.3, (predicted, measured)
    ckpt = plan_layout(exp, machine_for("a100", 1, 1, 80), shape, 1, 1, 1, "none", True, b)
    assert ckpt.memory["activations"] < plan.memory["activations"] / 2  # recomputation keeps inputs only


@pytest.fixture(scope="module")
def big():
    exp = load_experiment(VIT_22B)
    return exp, model_shape(exp)


def test_vit_22b_without_zero_is_rejected_for_memory_and_its_own_layout_fits(big):
    exp, shape = big
    machine = machine_for("a100", 32, 4, 80)
    dp = plan_layout(exp, machine, shape, 1, 1, 0, "none", True, 1)
    assert not dp.fits and "memory" in dp.reason
    # 21.7B parameters x (2 + 4 + 12) bytes cannot fit 80 GB, whatever the activations
    assert dp.memory_gb > exp.model.parameters * 18 / GIB
    own = plan_layout(exp, machine_for("a100", 256, 4, 80), shape, 8, 4, 1, "none", True, 8)
    assert own.fits, own.reason
    assert own.step_s > 0 and 0 < own.mfu < 1


def test_pipe_with_zero_3_is_rejected_with_the_reason(big):
    exp, shape = big
    plan = plan_layout(exp, machine_for("a100", 32, 4, 80), shape, 8, 4, 3, "none", True, 8)
    assert not plan.fits and "ZeRO" in plan.reason and "pipe" in plan.reason
    odd = plan_layout(exp, machine_for("a100", 32, 4, 80), shape, 1, 32, 1, "none", True, 8)
    assert "attention heads" in odd.reason


def test_bubble_shrinks_with_more_micro_batches_and_grows_with_stages(tiny):
    exp, shape = tiny
    machine = machine_for("a100", 4, 4, 80)

    def bubble(pipe, micro):
        p = plan_layout(exp, machine, shape, pipe, 1, 1, "none", False, micro)
        return p.times_s["bubble"] / p.step_s

    assert bubble(1, 16) == 0
    assert bubble(2, 32) > bubble(2, 16) > bubble(2, 4) > bubble(2, 1) > 0  # fewer micro-batches per step
    assert bubble(4, 16) > bubble(2, 16)


def _deepspeed_1f1b_longest_path(forward, backward, m):
    """A 1F1B step's length as the longest path through its dependency graph: each stage's forward and
    backward passes in the order DeepSpeed's own ``TrainSchedule`` issues them, a forward after the
    previous stage's, a backward after the next stage's."""
    from graphlib import TopologicalSorter

    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    p, after = len(forward), {}
    for i in range(p):
        counts, previous = {"F": 0, "B": 0}, None
        for step in TrainSchedule(micro_batches=m, stages=p, stage_id=i).steps():
            for cmd in step:
                if isinstance(cmd, (ForwardPass, BackwardPass)):
                    kind = "F" if isinstance(cmd, ForwardPass) else "B"
                    node = (i, kind, counts[kind])  # the k-th forward (backward) is micro-batch k's
                    counts[kind] += 1
                    peer = (i - 1, "F", node[2]) if kind == "F" else (i + 1, "B", node[2])
                    after[node] = {n for n in (previous, peer) if n is not None and 0 <= n[0] < p}
                    previous = node
    end = {}
    for node in TopologicalSorter(after).static_order():
        i, kind, _ = node
        end[node] = max((end[n] for n in after[node]), default=0.0) + (forward[i] if kind == "F" else backward[i])
    return max(end.values())


@pytest.mark.parametrize("forward, backward", [((1.0, 1.0), (2.0, 2.0)), ((0.54, 0.46), (1.08, 0.92)),
                                               ((1.0, 3.0, 0.5, 1.0), (2.5, 5.0, 1.0, 1.5)),
                                               ((3.0, 1.0, 1.0, 1.0, 0.2, 2.0), (6.0, 1.5, 2.0, 2.0, 0.3, 4.5))])
def test_pipeline_step_is_deepspeeds_1f1b_schedule_timed(forward, backward):
    from vitscale.planner import SCHEDULE_CAP, one_f_one_b_s

    p, slowest = len(forward), max(f + b for f, b in zip(forward, backward))
    for m in (1, 2, p, 3 * p + 1, SCHEDULE_CAP + 40):
        step = one_f_one_b_s(forward, backward, m)
        assert step == pytest.approx(_deepspeed_1f1b_longest_path(forward, backward, m), rel=1e-3), m
        assert step <= sum(f + b for f, b in zip(forward, backward)) + (m - 1) * slowest + 1e-9  # DAPPLE's bound
        if len(set(forward)) == 1 and len(set(backward)) == 1:  # balanced: (m + p - 1) stages' times, by hand
            assert step == pytest.approx((m + p - 1) * slowest)


def test_unbalanced_clip_stages_are_not_charged_the_slowest_stage_each_slot():
    exp = load_experiment(ROOT / "configs" / "clip_tiny.yaml", ["train.global_batch=32", "train.micro_batch=16"])
    shape = model_shape(exp)
    slow = machine_for("a100", 2, 2, 80, peak_tflops=1e-3, latency_us=0.0)  # compute far above communication
    plan = plan_layout(exp, slow, shape, 2, 1, 1, "none", False, 16)
    assert plan.grad_accum == 2
    slowest = plan.times_s["compute"] / plan.grad_accum  # the image tower's stage, per micro-batch
    pipeline = plan.step_s - plan.times_s["optimizer"] - plan.times_s["data_comm"]
    assert plan.grad_accum * slowest < pipeline < 0.97 * (plan.grad_accum + 2 - 1) * slowest  # not 3 x the slowest


def _cli(args):
    from vitscale.tools.plan import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(args)
    return rc, out.getvalue()


def test_cli_json_rows():
    rc, out = _cli([TINY, "train.global_batch=64", "--gpus", "8", "--gpus-per-node", "4", "--gpu-mem", "16",
                    "--device", "h100", "--micro-batch", "8,16", "--json"])
    assert rc == 0
    rows = json.loads(out)["layouts"]
    keys = {"pipe", "tensor", "data", "zero", "offload", "checkpointing", "micro_batch", "fits", "reason",
            "memory_gb", "step_s", "samples_per_s", "mfu", "params_gb", "grads_gb", "optimizer_gb",
            "activations_gb", "buckets_gb", "framework_gb"}
    assert rows and all(keys <= set(r) for r in rows)
    fits = [r for r in rows if r["fits"]]
    assert fits and all(r["reason"] == "" for r in fits) and all(r["reason"] for r in rows if not r["fits"])
    assert [r["samples_per_s"] for r in fits] == sorted((r["samples_per_s"] for r in fits), reverse=True)
    assert {(r["pipe"], r["tensor"], r["data"]) for r in rows} >= {(1, 1, 8), (2, 2, 2), (8, 1, 1)}


def test_cli_scaling_table():
    rc, out = _cli([TINY, "train.global_batch=96", "--device", "v100", "--gpus-per-node", "6", "--micro-batch", "16",
                    "--scaling", "1,2", "--nodes"])
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("| # Nodes | # GPUs | samples/s | efficiency")
    assert lines[2].startswith("| 1 | 6 |") and "100.0%" in lines[2] and lines[3].startswith("| 2 | 12 |")


@pytest.mark.parametrize("args, message", [
    (["--gpus", "6", "--gpus-per-node", "4"], "whole number of nodes"),
    (["--gpus", "4", "--device", "tpu"], "unknown device 'tpu'"),
    (["--gpus", "4", "--device", "cpu"], "--peak-tflops"),
    ([], "--gpus"),
    (["--gpus", "4", "model.name=vit_nope"], "not a registered model"),
])
def test_cli_bad_input_fails_early_naming_the_fix(args, message, caplog):
    rc, out = _cli([TINY, *args])
    assert rc == 2 and out == ""
    assert message in caplog.text


def test_cli_rejects_a_bad_number():
    with pytest.raises(SystemExit):
        _cli([TINY, "--gpus", "0"])


def test_a_start_carries_its_prediction():
    from vitscale.train.setup import plan_run

    plan = plan_run(TINY, ["parallel.zero=1"], world_size=2)
    assert plan.prediction.startswith("predicted memory per device")
