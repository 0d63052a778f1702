"""Every layout trains the same function (the central test of the project).

Fixed seed, same global batch, fp32, 4 optimizer steps, dropout and drop-path on (their masks
are keyed to the sample, models/noise.py, so every layout draws the masks one process draws):
the loss of each step must match the single-process run within 1e-5 relative, and the global
gradient norm DeepSpeed clips with within 1e-5 too. The norms are compared because clipping is
active (norms ~8 against a clip of 1): a uniform gradient-scale error (gradients summed instead
of averaged over data ranks, a replicated parameter's gradient counted twice under tensor
parallelism) cancels in the clipped update and leaves the losses of the first steps unchanged.
Three launches cover all layouts: one 2-process launch, the single-process references (plain python)
and one 4-process launch, each training several layouts in turn (tests/train/layouts.py). The same matrix
in bf16, with a tolerance from a measured bf16-vs-fp32 difference, is in tests/train/test_precision.py.
"""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitscale.models import create_model
from vitscale.models.clip import clip_config

from tests.conftest import ROOT, TINY, launch_layouts, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.seed=3", "train.precision=fp32", "log.every=1", "log.progress=false",
          "model.depth=4", "train.micro_batch=4", "train.global_batch=16", "optim.warmup_steps=2",
          "optim.grad_clip=1.0", "checkpoint.at_end=false", "data.num_workers=0",
          "model.drop_path_rate=0.1", "model.drop_rate=0.1", "model.attn_drop_rate=0.1"]

TWO = {
    "data2_zero0": ["parallel.zero=0"],
    "data2_zero1": ["parallel.zero=1"],
    "data2_zero2": ["parallel.zero=2"],
    "data2_zero3": ["parallel.zero=3"],
    "tensor2": ["parallel.tensor=2", "parallel.zero=0"],
    "pipe2": ["parallel.pipe=2", "parallel.zero=0"],
    "pipe2_recompute": ["parallel.pipe=2", "parallel.zero=1", "parallel.activation_checkpoint=1",
                        "log.peak_tflops=1.0"],
    "data2_recompute": ["parallel.zero=1", "parallel.activation_checkpoint=2"],
}
# The ViT-22B recipe and Dual PatchNorm (issue 11) in the same launch: data 2, tensor 2 and
# pipe 2 (with recomputation of the parallel blocks) must train the same function.
ARCH = ["model.qk_norm=true", "model.parallel_block=true", "model.dual_patchnorm=true", "model.bias=false"]
ARCH_TWO = {"arch_data2": ARCH + ["parallel.zero=1"], "arch_tensor2": ARCH + ["parallel.tensor=2"],
            "arch_pipe2": ARCH + ["parallel.pipe=2", "parallel.activation_checkpoint=1"]}
# optim.name (issue 24): Lion is elementwise, so ZeRO-2's flat partitions and tensor shards must train what
# whole parameters train; LAMB's per-parameter trust ratio must be the same whole or staged.
OPTIM_TWO = {"lion_data2_zero2": ["optim.name=lion", "parallel.zero=2"],
             "lion_tensor2": ["optim.name=lion", "parallel.tensor=2", "parallel.zero=0"],
             "lamb_data2": ["optim.name=lamb", "parallel.zero=0"],
             "lamb_pipe2": ["optim.name=lamb", "parallel.pipe=2", "parallel.zero=0"]}
# train.compile (issue 21): each block compiled (aot_eager: dynamo's graphs and AOT autograd without
# inductor's code generation, which ../shared/acceptance/speed exercises), under tensor 2 and in pipeline stages.
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
COMPILE_TWO = {name: {"overrides": COMPILED + overrides, "call": "tests.train.test_parallel:train_counting_graphs"}
               for name, overrides in {"compile_tensor2": ["parallel.tensor=2", "parallel.zero=0"],
                                       "compile_pipe2": ["parallel.pipe=2", "parallel.zero=1"]}.items()}
FOUR = {
    "tensor2_data2_zero1": ["parallel.tensor=2", "parallel.zero=1"],
    "tensor2_data2_zero3": ["parallel.tensor=2", "parallel.zero=3"],
    "pipe2_tensor2": ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1"],
    "pipe2_data2_zero1": ["parallel.pipe=2", "parallel.zero=1", "parallel.partition=parameters"],
    "tensor4": ["parallel.tensor=4", "parallel.zero=1"],
    "pipe4": ["parallel.pipe=4", "parallel.zero=0", "parallel.partition=uniform"],
    "arch_pipe2_tensor2": ARCH + ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1"],  # the ViT-22B block
}


# Weight sparsity (issue 25) in the same launch. Unstructured, on Zhu & Gupta's cubic from 0 to 0.75 over
# steps 0-3 (one mask update per step, each ranked on the whole matrix): data 2, tensor 2 (thresholds over
# the gathered shards) and pipe 2 must train the same function. 2:4 under tensor 2 and ZeRO-1: the pattern
# and the master copy are checked at every step boundary (tests/train/sparsity_probe.py), the mask set
# after one dense step. (Resume with masks: tests/train/test_reliability.py.)
UNSTRUCTURED = ["model.sparsity.pattern=unstructured", "model.sparsity.target=0.75", "model.sparsity.schedule=gradual",
                "model.sparsity.end_step=3"]
NM = ["model.sparsity.pattern=2:4", "model.sparsity.dense_warmup=1", "parallel.tensor=2", "parallel.zero=1"]
SPARSE_TWO = {
    "sparse_data2": UNSTRUCTURED + ["parallel.zero=1"],
    "sparse_tensor2": UNSTRUCTURED + ["parallel.tensor=2", "parallel.zero=0"],
    "sparse_pipe2": UNSTRUCTURED + ["parallel.pipe=2", "parallel.zero=0"],
    "sparse_nm_tensor2": {"overrides": NM, "call": "tests.train.sparsity_probe:check_nm_after_every_step"},
}


# data.render=device (issue 22) in the same launches: FractalDB rendered on each rank's device from the labels and
# instances of its samples; data 2 must see the single process's images, so train the same function.
DEVICE_RENDER = ["data.source=fractal", "data.render=device", "data.params={num_points: 20000}"]


def _launch_layouts(root: Path, nprocs: int, layouts: dict, config: str = TINY, common: list = COMMON) -> None:
    launch_layouts(root, nprocs, layouts, common, config)


# Starting weights (model.init) load into every layout: a whole-model file is sliced to
# each tensor shard / pipeline stage, so all layouts start from the same function.
INIT = {"init_data2": ["parallel.zero=1"], "init_tensor2": ["parallel.tensor=2"], "init_pipe2": ["parallel.pipe=2"]}


def _with_init(layouts: dict, path) -> dict:
    return {name: overrides + [f"model.init={path}"] for name, overrides in layouts.items()}


# Issue 25's distillation and AdaTape in the same launches. The teacher is a ZeRO-1 run of depth 2 trained in the
# 2-process launch (a run folder of another layout and depth than its students); alpha=1 must give the losses of
# the run without a teacher bit for bit; tensor 2 and ZeRO-3 must train what one process trains (a 1-process
# launch holds both references); the tensor-2 student checks its teacher stays frozen (test_distill.py's probe).
DISTILL = ["train.distill.temperature=2", "train.distill.alpha=0.5"]
ADATAPE = ["model.adatape.bank=input", "model.adatape.max_tokens=4", "model.adatape.threshold=0.3"]


def _seed_methods(root: Path, init: Path) -> tuple[dict, dict]:
    """(2-process layouts, 1-process references) of distillation and AdaTape. alpha=1 comes right after
    the run it must equal bit for bit (data2_zero0, the launch's first): later in the same launch the
    plain run's losses differ in the last bit (2e-7 relative, seen after the other layouts ran)."""
    teacher = [f"train.distill.teacher={root / 'distill_teacher'}", *DISTILL]
    two = {"data2_zero0": TWO["data2_zero0"],
           "distill_alpha1": ["parallel.zero=0", f"train.distill.teacher={init}", "train.distill.alpha=1"],
           "distill_teacher": ["parallel.zero=1", "model.depth=2", "checkpoint.at_end=true"],
           "distill_tensor2": {"overrides": ["parallel.tensor=2", *teacher],
                               "call": "tests.train.test_distill:train_with_frozen_check"},
           "distill_zero3": ["parallel.zero=3", *teacher],
           "adatape_tensor2": ["parallel.tensor=2", *ADATAPE]}
    one = {"distill_single": ["parallel.zero=0", *teacher], "adatape_single": ["parallel.zero=0", *ADATAPE]}
    return two, one


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(123)
    init = root / "init.safetensors"
    save_file(create_model("vit_tiny_patch16", img_size=64, num_classes=10, depth=4, num_heads=4).state_dict(), init)
    seed_two, seed_one = _seed_methods(root, init)
    _launch_layouts(root, 2, {**seed_two, **TWO, **_with_init(INIT, init), **ARCH_TWO, **OPTIM_TWO, **COMPILE_TWO, **SPARSE_TWO,
                              "device_data2": DEVICE_RENDER + ["parallel.zero=1"]})
    # The single-process references after it: the distillation reference needs the teacher it trains.
    _launch_layouts(root, 1, {"single": ["parallel.zero=0"], **seed_one, "device_single": DEVICE_RENDER + ["parallel.zero=0"]})
    _launch_layouts(root, 4, FOUR)
    return root


def grad_norms(run_dir) -> list[float]:
    return [r["grad_norm"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def assert_same_function(run_dir, ref_dir, layout: str) -> None:
    """Step by step, the loss and the clipped-with gradient norm within 1e-5 relative. The layouts agree
    to < 3e-7; the smallest plausible error, a doubled gradient of the blocks' norm1 weights (a
    replicated parameter counted on two tensor ranks), moves the norm by 4.5e-5."""
    ref, got = train_losses(ref_dir), train_losses(run_dir)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5), f"{layout}: losses {got} vs {ref}"
    ref_norms, got_norms = grad_norms(ref_dir), grad_norms(run_dir)
    assert None not in got_norms and min(ref_norms) > 1.0  # logged every step; clipping is active
    assert got_norms == pytest.approx(ref_norms, rel=1e-5), f"{layout}: gradient norms {got_norms} vs {ref_norms}"


@pytest.mark.parametrize("layout", [n for n in list(TWO) + list(FOUR) if not n.startswith("arch")])
def test_layout_matches_single_process(runs, layout):
    assert_same_function(runs / layout, runs / "single", layout)
    assert train_losses(runs / "single")[-1] != train_losses(runs / "single")[0]  # the reference actually trained


def test_device_rendering_trains_the_same_function_in_every_layout(runs):
    assert_same_function(runs / "device_data2", runs / "device_single", "device_data2")
    assert train_losses(runs / "device_single") != train_losses(runs / "single")  # it read FractalDB, not gratings


def test_architecture_options_train_the_same_function_in_every_layout(runs):
    ref = train_losses(runs / "arch_data2")
    assert len(ref) == STEPS and ref[-1] != ref[0]  # it trained
    assert ref[0] != pytest.approx(train_losses(runs / "single")[0], rel=1e-3)  # the options changed the model
    for layout in ("arch_tensor2", "arch_pipe2", "arch_pipe2_tensor2"):
        assert_same_function(runs / layout, runs / "arch_data2", layout)


def train_counting_graphs(run):
    """A layouts.py probe: train, then write what dynamo compiled in this process (blocks compiled, graphs, calls
    captured) into run.dir/dynamo<rank>.json."""
    import json

    from torch._dynamo.utils import counters

    from vitscale.train.loop import train

    counters.clear()
    train(run)
    stats = {"unique_graphs": counters["stats"]["unique_graphs"], "calls_captured": counters["stats"]["calls_captured"],
             "blocks": sum(type(m).__name__.endswith("Block") and getattr(m, "_compiled_call_impl", None) is not None
                           for m in run.engine.module.modules())}
    (Path(run.cfg.run.dir) / f"dynamo{run.dims.rank}.json").write_text(json.dumps(stats))


def test_compiled_blocks_train_the_same_function(runs):
    import json

    for layout in COMPILE_TWO:
        assert_same_function(runs / layout, runs / "single", layout)
        for rank in (0, 1):
            stats = json.loads((runs / layout / f"dynamo{rank}.json").read_text())
            # every block of the rank compiled (tensor 2: the model's 4; pipe 2: the stage's 2) and graphs captured;
            # the blocks share their graphs instead of one graph per block (each block's noise site is another
            # Python int: models/parallelize.py): at most 3 (the first block without drop-path; the next, before
            # dynamo makes the site dynamic; the rest), so fewer than the 4 blocks of a tensor rank
            assert stats["blocks"] == (4 if "tensor" in layout else 2), (layout, rank, stats)
            assert 1 <= stats["unique_graphs"] <= min(3, stats["blocks"]) and stats["calls_captured"] > 0, (
                layout, rank, stats)


def test_lion_and_lamb_train_the_same_function_in_every_layout(runs):
    adamw = train_losses(runs / "data2_zero2")
    for ref, other in (("lion_data2_zero2", "lion_tensor2"), ("lamb_data2", "lamb_pipe2")):
        assert_same_function(runs / other, runs / ref, other)
        # the optimizer is in use: from the third step (the first with a non-zero LR applied) it is not AdamW
        assert train_losses(runs / ref)[2:] != pytest.approx(adamw[2:], rel=1e-4), ref


def test_initial_weights_load_into_every_layout(runs):
    ref = train_losses(runs / "init_data2")
    for layout in INIT:
        assert train_losses(runs / layout) == pytest.approx(ref, rel=1e-5), layout
    assert ref[0] != pytest.approx(train_losses(runs / "single")[0], rel=1e-3)  # the file, not the seed


def test_distillation_trains_the_same_function_in_every_layout(runs):
    ref = read_metrics(runs / "distill_single")
    train = [r for r in ref if r["kind"] == "train"]
    assert all("loss_label" in r and "loss_distill" in r for r in train) and len(train) == STEPS
    assert train[0]["loss"] == pytest.approx(0.5 * train[0]["loss_label"] + 0.5 * train[0]["loss_distill"], rel=1e-6)
    assert train[-1]["loss_distill"] < train[0]["loss_distill"]  # the student moves toward the teacher
    for layout in ("distill_tensor2", "distill_zero3"):
        assert_same_function(runs / layout, runs / "distill_single", layout)
    # The teacher's FLOPs are counted apart: a depth-2 teacher's forward, beside the student's own MFU figures.
    rows = [r for r in read_metrics(runs / "distill_tensor2") if r["kind"] == "throughput" and r["scope"] == "global"]
    teacher_share = rows[-1]["teacher_tflops_per_device"] / rows[-1]["tflops_per_device"]
    assert rows[-1]["teacher_flops_per_sample"] > 0 and 0 < teacher_share < 1


def test_distillation_with_alpha_one_is_the_run_without_a_teacher(runs):
    assert train_losses(runs / "distill_alpha1") == train_losses(runs / "data2_zero0")  # bit for bit
    assert [r["loss_distill"] for r in read_metrics(runs / "distill_alpha1") if r["kind"] == "train"][0] > 0


def test_adatape_under_tensor_parallelism_trains_what_one_process_trains(runs):
    assert_same_function(runs / "adatape_tensor2", runs / "adatape_single", "adatape_tensor2")
    ref = read_metrics(runs / "adatape_single")
    assert train_losses(runs / "adatape_single")[0] != pytest.approx(train_losses(runs / "single")[0], rel=1e-3)
    tape = [r["tape_tokens"] for r in ref if r["kind"] == "train"]
    assert len(tape) == STEPS and all(1 <= t <= 4 for t in tape)


def test_records_name_the_layout(runs):
    rows = [r for r in read_metrics(runs / "pipe2_tensor2") if r["kind"] == "throughput" and r["scope"] == "global"]
    assert rows and rows[-1]["layout"] == {"pipe": 2, "tensor": 2, "data": 1, "zero": 1}
    assert rows[-1]["devices"] == 4
    rows = [r for r in read_metrics(runs / "pipe2_recompute") if r["kind"] == "throughput" and r["scope"] == "global"]
    # Recomputation is hardware work, not model work: HFU counts 4 forward passes, MFU 3.
    assert rows[-1]["hfu"] == pytest.approx(rows[-1]["mfu"] * 4 / 3)


def test_sparse_layouts_train_the_same_function(runs):
    ref = train_losses(runs / "sparse_data2")
    assert ref[1:] != pytest.approx(train_losses(runs / "data2_zero1")[1:], rel=1e-4)  # the masks changed the model
    for layout in ("sparse_tensor2", "sparse_pipe2"):
        assert_same_function(runs / layout, runs / "sparse_data2", layout)


def test_unstructured_sparsity_follows_the_cubic_schedule(runs):
    # Zhu & Gupta 2017, eq. 1 with s_i = 0, s_f = 0.75, t0 = 0, n * dt = 3: the zeros the weights hold
    # after each step, as logged; the non-zero count is the model's parameters less them.
    whole = create_model("vit_tiny_patch16", img_size=64, num_classes=10, depth=4, num_heads=4)
    total = sum(p.numel() for p in whole.parameters())
    sparse = sum(p.numel() for name, p in whole.named_parameters()
                 if name.startswith("blocks.") and name.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")))
    for layout in ("sparse_data2", "sparse_tensor2", "sparse_pipe2"):
        rows = [r for r in read_metrics(runs / layout) if r["kind"] == "train"]
        want = [0.75 * (1 - (1 - min(r["step"], 3) / 3) ** 3) for r in rows]
        assert [r["sparsity"] for r in rows] == pytest.approx(want, abs=2e-4), layout
        assert [r["nonzero_params"] for r in rows] == [total - round(r["sparsity"] * sparse) for r in rows], layout


def test_nm_sparsity_holds_its_pattern_at_every_step(runs):
    # The probe asserted the pattern on every rank at every step; here what it logged.
    rows = [r for r in read_metrics(runs / "sparse_nm_tensor2") if r["kind"] == "train"]
    assert [r["sparsity"] for r in rows] == [0.5] * STEPS  # exactly half the block weights are zero
    assert rows[-1]["loss"] != rows[0]["loss"]


# CLIP: the contrastive loss spans the whole global batch in every layout (gathered over
# data ranks, cached over accumulated micro-batches), so data 2 (one micro-batch each) and
# data 1 (two accumulated micro-batches, plain engine or pipeline) train the same function.
CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
CLIP_COMMON = [f"train.steps={STEPS}", "train.seed=3", "train.precision=fp32", "log.every=1", "log.progress=false",
               "train.micro_batch=8", "train.global_batch=16", "optim.warmup_steps=2", "checkpoint.at_end=false",
               "data.num_workers=0"]
CLIP_TWO = {
    "clip_data2_zero0": ["parallel.zero=0"],
    "clip_data2_zero1": ["parallel.zero=1"],
    "clip_data2_zero2": ["parallel.zero=2"],
    "clip_data2_zero3": ["parallel.zero=3", "checkpoint.at_end=true"],
    "clip_tensor2": ["parallel.tensor=2", "parallel.zero=1"],
    "clip_pipe2": ["parallel.pipe=2", "parallel.zero=1"],
}
CLIP_FOUR = {
    "clip_pipe2_tensor2": ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1", "checkpoint.at_end=true"],
    "clip_tensor2_data2": ["parallel.tensor=2", "parallel.zero=1"],
    "clip_tensor2_data2_zero3": ["parallel.tensor=2", "parallel.zero=3"],
    "clip_pipe2_data2": ["parallel.pipe=2", "parallel.zero=1"],
}


CLIP_INIT = {"oc_data2": ["parallel.zero=1"], "oc_tensor2": ["parallel.tensor=2"], "oc_pipe2": ["parallel.pipe=2"]}

# CapPa (train.objective=cappa, issue 25) on the same config and launch: its decoder's self- and cross-attention
# split over tensor ranks, and data 2 with ZeRO-3, against its own single-process run.
CAPPA = ["train.objective=cappa", "checkpoint.at_end=true"]
CAPPA_TWO = {"cappa_tensor2": CAPPA + ["parallel.tensor=2", "parallel.zero=1"],
             "cappa_data2_zero3": CAPPA + ["parallel.zero=3"]}


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("clip_layouts")
    # An open_clip model of clip_tiny's shape, saved with open_clip's names.
    torch.manual_seed(7)
    twin = open_clip.model.CLIP(**clip_config("clip_tiny").to_dict())
    init = root / "open_clip.pt"
    torch.save(twin.state_dict(), init)
    run_training(root / "single", CLIP_COMMON + ["parallel.zero=0", "checkpoint.at_end=true"], launcher="python",
                 nprocs=1, config=CLIP_TINY)
    run_training(root / "cappa_single", CLIP_COMMON + CAPPA + ["parallel.zero=0"], launcher="python", nprocs=1,
                 config=CLIP_TINY)
    _launch_layouts(root, 2, {**CLIP_TWO, **_with_init(CLIP_INIT, init), **CAPPA_TWO}, CLIP_TINY, CLIP_COMMON)
    _launch_layouts(root, 4, CLIP_FOUR, CLIP_TINY, CLIP_COMMON)
    return root


@pytest.mark.parametrize("layout", list(CLIP_TWO) + list(CLIP_FOUR))
def test_clip_layout_matches_single_process(clip_runs, layout):
    assert_same_function(clip_runs / layout, clip_runs / "single", layout)
    ref = train_losses(clip_runs / "single")
    assert ref[-1] < ref[0]  # the reference trained
    rows = [r for r in read_metrics(clip_runs / layout) if r["kind"] == "throughput" and r["scope"] == "global"]
    assert rows and rows[-1]["tflops_per_device"] > 0  # CLIP FLOPs are counted too


def test_open_clip_weights_start_every_clip_layout(clip_runs):
    ref = train_losses(clip_runs / "oc_data2")
    for layout in CLIP_INIT:
        assert train_losses(clip_runs / layout) == pytest.approx(ref, rel=1e-5), layout
    assert ref[0] != pytest.approx(train_losses(clip_runs / "single")[0], rel=1e-3)


def test_clip_exports_from_any_layout_load_into_open_clip(clip_runs, tmp_path):
    import open_clip

    from vitscale.train.export import export_run

    exported = {}
    for layout in ["single", "clip_data2_zero3", "clip_pipe2_tensor2"]:
        export_run(clip_runs / layout, tmp_path / f"{layout}.pt", "open_clip")
        exported[layout] = torch.load(tmp_path / f"{layout}.pt", weights_only=True)
    ref = exported["single"]
    twin = open_clip.model.CLIP(**clip_config("clip_tiny").to_dict())
    twin.load_state_dict(ref, strict=True)  # open_clip's own names and shapes
    for layout, state in exported.items():
        assert state.keys() == ref.keys()
        # Trained 4 steps in different layouts: the same weights up to round-off, which Adam
        # amplifies for elements whose gradient is near its eps (a rarely seen token's
        # embedding moves ~3e-5 apart); a wrong merge or slice would be off by the weights' scale (~1e-2).
        for key in ref:
            torch.testing.assert_close(state[key], ref[key], rtol=1e-3, atol=1e-4, msg=f"{layout}: {key}")


def _cappa_terms(run_dir) -> dict[str, list[float]]:
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    return {key: [r[key] for r in rows] for key in ("loss_ar", "loss_parallel", "parallel_share")}


def test_cappa_trains_both_branches_and_logs_their_losses(clip_runs):
    terms = _cappa_terms(clip_runs / "cappa_single")
    for key in ("loss_ar", "loss_parallel"):
        assert len(terms[key]) == STEPS and all(map(math.isfinite, terms[key])), terms
        assert terms[key][-1] < terms[key][0] - 0.5, f"{key} did not fall: {terms[key]}"
    assert all(0 < share < 1 for share in terms["parallel_share"])  # every step trained both branches
    rows = [r for r in read_metrics(clip_runs / "cappa_single") if r["kind"] == "throughput" and r["scope"] == "global"]
    assert rows and rows[-1]["tflops_per_device"] > 0  # the decoder's FLOPs are counted


@pytest.mark.parametrize("layout", list(CAPPA_TWO))
def test_cappa_layout_matches_single_process(clip_runs, layout):
    assert_same_function(clip_runs / layout, clip_runs / "cappa_single", layout)
    got, ref = _cappa_terms(clip_runs / layout), _cappa_terms(clip_runs / "cappa_single")
    assert got["parallel_share"] == ref["parallel_share"]  # the same samples took the same branch
    assert got["loss_ar"] == pytest.approx(ref["loss_ar"], rel=1e-5)
    assert got["loss_parallel"] == pytest.approx(ref["loss_parallel"], rel=1e-5)


def test_cappa_image_tower_exports_to_timm_from_tensor2(clip_runs, tmp_path):
    from safetensors.torch import load_file

    from vitscale.models.interop import create_timm_model, library_config
    from vitscale.train.checkpoint import load_run
    from vitscale.train.export import export_run

    export_run(clip_runs / "cappa_tensor2", tmp_path / "timm.safetensors", "timm")
    export_run(clip_runs / "cappa_single", tmp_path / "ours.safetensors", "vitscale")
    run = load_run(clip_runs / "cappa_single")
    ours = run.model.create().eval()
    ours.load_state_dict(load_file(tmp_path / "ours.safetensors"), strict=True)
    timm_model = create_timm_model(library_config(ours, "timm")).eval()
    timm_model.load_state_dict(load_file(tmp_path / "timm.safetensors"), strict=True)  # timm's own names
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # tensor 2's merged tower in timm computes the single process's tower
        torch.testing.assert_close(timm_model(images), ours.encode_image(images), rtol=1e-3, atol=1e-4)
