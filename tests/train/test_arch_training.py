"""Soft MoE and NaViT packing train on 2 processes (issue 11), in one grouped launch.

Soft MoE: data 2 learns (the loss falls), and tensor 2 (experts replicated on the tensor
ranks) and pipe 2 train the same function as data 2. Packing: data 2 with sampled
resolutions and token dropping learns; its throughput records count the FLOPs of the
packed sequences. The packing model's factorized positions also run in a pipeline.
"""
import pytest

from tests.conftest import launch_layouts, read_metrics, train_losses
from vitscale.experiment import load_experiment
from vitscale.models.flops import packed_forward_flops

pytestmark = pytest.mark.distributed

STEPS = 14
COMMON = [f"train.steps={STEPS}", "train.seed=5", "train.precision=fp32", "log.every=1", "log.progress=false",
          "model.depth=4", "train.micro_batch=8", "train.global_batch=16", "optim.warmup_steps=2",
          "checkpoint.at_end=false", "data.num_workers=0", "train.lr=2e-3", "data.image_size=32",
          "model.patch_size=8"]
MOE = ["model.moe.blocks=2", "model.moe.experts=4", "model.moe.slots=2"]
PACK = ["model.pos_embed=factorized", "model.class_token=false", "model.global_pool=avg", "data.packing.seq_len=40",
        "data.packing.max_images=4", "data.packing.min_size=16", "data.packing.token_drop=0.25"]
LAYOUTS = {
    "moe_data2": MOE + ["parallel.zero=1"],
    "moe_tensor2": MOE + ["parallel.tensor=2", "train.steps=3"],
    "moe_pipe2": MOE + ["parallel.pipe=2", "train.steps=3"],
    "packing_data2": PACK + ["parallel.zero=1"],
    # the packing model's factorized positions without a class token, unpacked, split over a pipeline
    "factorized_data2": PACK[:3] + ["train.steps=3"],
    "factorized_pipe2": PACK[:3] + ["parallel.pipe=2", "train.steps=3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    launch_layouts(root, 2, LAYOUTS, COMMON)
    return root


def _falls(losses: list[float]) -> bool:
    # The mean of the last three steps below the mean of the first three.
    return sum(losses[-3:]) < sum(losses[:3])


def test_soft_moe_learns_on_two_processes(runs):
    losses = train_losses(runs / "moe_data2")
    assert len(losses) == STEPS and _falls(losses), losses


@pytest.mark.parametrize("layout", ["moe_tensor2", "moe_pipe2"])
def test_soft_moe_trains_the_same_function_in_other_layouts(runs, layout):
    ref = train_losses(runs / "moe_data2")[:3]
    assert train_losses(runs / layout) == pytest.approx(ref, rel=1e-5)


def test_factorized_positions_train_the_same_function_in_a_pipeline(runs):
    ref = train_losses(runs / "factorized_data2")
    assert len(ref) == 3 and train_losses(runs / "factorized_pipe2") == pytest.approx(ref, rel=1e-5)


def test_packing_learns_on_two_processes_and_counts_packed_flops(runs):
    losses = train_losses(runs / "packing_data2")
    assert len(losses) == STEPS and _falls(losses), losses
    arch = load_experiment(None, COMMON + PACK + ["data.source=fractal"]).model.arch
    rows = [r for r in read_metrics(runs / "packing_data2") if r["kind"] == "throughput" and r["scope"] == "global"]
    flops = 3 * packed_forward_flops(arch, 40, 4)  # per packed sequence, forward + backward
    assert rows and rows[-1]["tflops_per_device"] == pytest.approx(
        rows[-1]["samples_per_s_per_device"] * flops / 1e12, rel=1e-3)
