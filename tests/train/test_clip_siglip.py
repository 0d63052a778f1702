"""CLIP as open_clip trains it, in every layout (issue 18): ``train.loss=siglip`` trains the same
function in tensor 2, data 2 and pipe 2 as on one process and exports to open_clip with its
logit bias; the logit scale is clamped to log 100 on the parameter and on the optimizer's fp32
master copy after each step; a bf16 run exports (and reshards) its fp32 master weights, not
their bf16 rounding.

Two launches (one module-scoped fixture): the single-process SigLIP reference, and one 2-process
launch (tests/train/layouts.py) training the SigLIP layouts, three bf16 layouts started from a
logit scale above log 100, and a reshard of the bf16 data-2 checkpoint into pipe 2.
"""
import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, launch_layouts, read_metrics, run_training, train_losses
from vitscale.models import create_model
from vitscale.models.interop import merge_tensor_parallel
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint
from vitscale.train.export import export_run

pytestmark = pytest.mark.distributed

CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
STEPS, BF16_STEPS = 4, 3
COMMON = ["train.seed=3", "log.every=1", "log.progress=false", "train.micro_batch=8", "train.global_batch=16",
          "optim.warmup_steps=2", "data.num_workers=0", "checkpoint.at_end=true"]
SIGLIP = [f"train.steps={STEPS}", "train.precision=fp32", "train.loss=siglip"]
SIGLIP_TWO = {"sig_tensor2": SIGLIP + ["parallel.tensor=2", "parallel.zero=1"],
              "sig_data2": SIGLIP + ["parallel.zero=1"],
              "sig_pipe2": SIGLIP + ["parallel.pipe=2", "parallel.zero=1"]}
# bf16 from a logit scale of 4.7 > log 100: each DeepSpeed optimizer that keeps a bf16 run's fp32 master
# once (the ZeRO-2 optimizer: data 2, which DeepSpeed's zero_to_fp32 also reads; BF16_Optimizer, which
# bf16 ZeRO-1 gets with fp32 gradient accumulation: tensor 2 and pipe 2). bf16 with ZeRO-0
# is refused (config/validation.py); the ZeRO-0 fp16 master (FP16_Optimizer) is fp16-only, which
# DeepSpeed's CPU accelerator does not train, so it is not covered here.
BF16 = [f"train.steps={BF16_STEPS}", "train.precision=bf16"]
BF16_TWO = {"bf16_data2": BF16 + ["parallel.zero=2"], "bf16_tensor2": BF16 + ["parallel.tensor=2", "parallel.zero=1"],
            "bf16_pipe2": BF16 + ["parallel.pipe=2", "parallel.zero=1"]}
LN100 = torch.tensor(math.log(100), dtype=torch.float32).item()  # the fp32 bound the clamp writes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_issue18")
    torch.manual_seed(11)
    start = create_model("clip_tiny")
    with torch.no_grad():
        start.logit_scale.fill_(4.7)  # temperature 110: the step must clamp it, whatever the gradient says
    torch.save(start.state_dict(), root / "start.pt")
    bf16 = {name: overrides + [f"model.init={root / 'start.pt'}"] for name, overrides in BF16_TWO.items()}
    # Resharded into pipe 2 and stepped once at lr 0 (the cosine schedule's last step): its checkpoint
    # holds exactly the master weights the reshard wrote.
    reshard = ["train.precision=bf16", "parallel.pipe=2", "parallel.zero=1", "checkpoint.reshard=weights",
               f"checkpoint.resume={root}/bf16_data2/checkpoints/step{BF16_STEPS:08d}",
               f"train.steps={BF16_STEPS + 1}", "optim.warmup_steps=1"]
    run_training(root / "single", COMMON + SIGLIP + ["parallel.zero=0"], launcher="python", nprocs=1,
                 config=CLIP_TINY)
    launch_layouts(root, 2, {**SIGLIP_TWO, **bf16, "reshard_pipe2": reshard}, COMMON, CLIP_TINY)
    return root


@pytest.mark.parametrize("layout", list(SIGLIP_TWO))
def test_siglip_trains_the_single_process_function_in_every_layout(runs, layout):
    ref, got = train_losses(runs / "single"), train_losses(runs / layout)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5), f"{layout}: {got} vs single process {ref}"
    assert ref[-1] < ref[0]  # it trained
    assert load_run(runs / layout).model.loss == "siglip"


def test_siglip_export_is_open_clips_siglip_model(runs, tmp_path):
    import open_clip

    from vitscale.models.clip import clip_config

    export_run(runs / "sig_pipe2", tmp_path / "siglip.pt", "open_clip")
    state = torch.load(tmp_path / "siglip.pt", weights_only=True)
    cfg = clip_config("clip_tiny", init_logit_bias=-10.0, init_logit_scale=math.log(10))
    twin = open_clip.model.CLIP(**cfg.to_dict()).eval()
    assert twin.logit_bias is not None
    twin.load_state_dict(state, strict=True)
    assert state["logit_bias"].shape == () and state["logit_bias"].item() != -10.0  # trained, and carried over
    ours = load_run(runs / "sig_pipe2").model.create().eval()
    ours.load_state_dict(read_checkpoint(find_checkpoint(runs / "sig_pipe2")[0], load_run(runs / "sig_pipe2")))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 998, (4, 16), generator=g)
    tokens[:, 9] = 999  # end of text
    with torch.no_grad():
        image, text, scale, bias = ours(images, tokens)
        theirs = twin(images, tokens)
        logits = scale * image @ text.T + bias
        their_logits = theirs[2] * theirs[0] @ theirs[1].T + theirs[3]
    torch.testing.assert_close(logits, their_logits, rtol=1e-5, atol=1e-5)


def _module_weights(folder: Path, run) -> dict:
    """The bf16 weights the module held (DeepSpeed's model / layer files), merged as read_checkpoint does."""
    from vitscale.models.interop import pipeline_to_whole
    from vitscale.models.parallelize import layer_prefixes
    from vitscale.models.tensor_parallel import parallelize_vit

    tensor = run.cfg.parallel.tensor
    if run.cfg.parallel.pipe > 1:
        layers = {int(p.name[6:8]): torch.load(p, weights_only=True) for p in folder.glob("layer_*-model_00-*.pt")}
        return pipeline_to_whole(layers, layer_prefixes(run.model))
    shards = [torch.load(folder / f"mp_rank_{t:02d}_model_states.pt", weights_only=True)["module"]
              for t in range(tensor)]
    return merge_tensor_parallel(shards, parallelize_vit(run.model.meta(), 0, tensor, None)) if tensor > 1 else shards[0]


@pytest.mark.parametrize("layout", list(BF16_TWO))
def test_bf16_export_is_the_fp32_master_and_the_logit_scale_is_clamped(runs, layout, tmp_path):
    run = load_run(runs / layout)
    folder, step = find_checkpoint(runs / layout)
    assert step == BF16_STEPS
    master, module = read_checkpoint(folder, run), _module_weights(folder, run)
    assert {v.dtype for v in master.values()} == {torch.float32} and {v.dtype for v in module.values()} == {torch.bfloat16}
    # DeepSpeed copies the master into the module after each step: the module is its bf16 rounding,
    # and the master holds more than bf16 does.
    assert all(torch.equal(master[k].to(torch.bfloat16), module[k]) for k in module)
    assert sum(int((master[k] != module[k].float()).sum()) for k in module) > 0.9 * sum(v.numel() for v in module.values())
    # Clamped after the step, in the master too (4.7 - 3 steps x lr < log 100 < 4.7, so only the clamp gets it there).
    assert LN100 - 5e-3 < master["logit_scale"].item() <= LN100
    assert module["logit_scale"].float().item() <= LN100
    exported = export_run(runs / layout, tmp_path / "w.safetensors", "vitscale")
    assert exported.dtypes == ["float32"]


def test_bf16_master_equals_deepspeeds_own_zero_to_fp32(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, _ = find_checkpoint(runs / "bf16_data2")
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    ours = read_checkpoint(folder, load_run(runs / "bf16_data2"))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key].float()), key


def test_reshard_writes_the_fp32_master(runs):
    # A bf16 data-2 checkpoint continued in pipe 2 with checkpoint.reshard=weights for one step at lr 0:
    # the new run's master weights are the old run's fp32 values, not their bf16 rounding.
    before = read_checkpoint(find_checkpoint(runs / "bf16_data2")[0], load_run(runs / "bf16_data2"))
    folder, step = find_checkpoint(runs / "reshard_pipe2")
    assert step == BF16_STEPS + 1
    assert [r["lr"] for r in read_metrics(runs / "reshard_pipe2") if r["kind"] == "train"] == [0.0]
    after = read_checkpoint(folder, load_run(runs / "reshard_pipe2"))
    assert sorted(after) == sorted(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
