"""vitscale-export: tiny runs of every layout -> one whole-model state dict each, which
timm loads with strict=True, which is the same in every layout (they trained the same
function) as in the single-process run, and which computes what our model computes.

Three launches (one module-scoped fixture): the single-process reference, one 2-process
launch training data 2 ZeRO-1, data 2 ZeRO-3, tensor 2 and pipe 2 in turn, and one
4-process launch for pipe 2 x tensor 2 and tensor 2 x data 2 ZeRO-3
(tests/train/layouts.py: one start-up for several layouts).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import BIN, ROOT, launch_layouts, run_training
from vitscale.models.interop import shard_state_dict
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint
from vitscale.train.engine import build_model
from vitscale.train.export import export_run

pytestmark = pytest.mark.distributed

STEPS = 2
COMMON = [f"train.steps={STEPS}", "model.depth=2", "checkpoint.at_end=true", "data.num_workers=0",
          "data.source=gratings", "train.seed=5", "train.precision=fp32", "train.micro_batch=4",
          "train.global_batch=8", "log.progress=false", "log.every=1"]
TWO = {
    "data2_zero1": ["parallel.zero=1"],
    "data2_zero3": ["parallel.zero=3"],
    "tensor2": ["parallel.tensor=2", "parallel.zero=1"],
    "pipe2": ["parallel.pipe=2", "parallel.zero=1"],
}
FOUR = {
    "pipe2_tensor2": ["parallel.pipe=2", "parallel.tensor=2", "parallel.zero=1"],
    "tensor2_data2_zero3": ["parallel.tensor=2", "parallel.zero=3"],
}
LAYOUTS = ["single", *TWO, *FOUR]


def _launch(root: Path, nprocs: int, layouts: dict) -> None:
    launch_layouts(root, nprocs, layouts, COMMON)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    run_training(root / "single", COMMON + ["parallel.zero=0"], launcher="python", nprocs=1)
    _launch(root, 2, TWO)
    _launch(root, 4, FOUR)
    return root


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """Each layout's export for timm, as safetensors."""
    out = tmp_path_factory.mktemp("exported")
    return {name: export_run(runs / name, out / f"{name}.safetensors", to="timm").path for name in LAYOUTS}


def _timm_model():
    return timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=2, num_heads=4,
                             pretrained=False).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_loads_into_timm_and_computes_what_our_model_computes(runs, exported, layout):
    state = load_file(exported[layout])
    ref = _timm_model()
    ref.load_state_dict(state, strict=True)
    ours = load_run(runs / layout).model.create().eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_layout_exports_the_single_process_weights(runs, exported, layout):
    ref, got = load_file(exported["single"]), load_file(exported[layout])
    assert sorted(got) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=f"{layout}: {key}")
    # The run's own starting weights (train.seed=5, each tensor from its name): every tensor moved
    # in the 2 steps, so an export of the initial weights (a missed load, an unsaved step) fails.
    start = build_model(load_run(runs / layout)).state_dict()
    moved = [key for key in ref if not torch.allclose(start[key].float(), ref[key].float(), rtol=0, atol=1e-7)]
    assert sorted(moved) == sorted(ref), f"tensors that kept their initial values: {sorted(set(ref) - set(moved))}"


def test_metadata_says_how_to_rebuild(exported):
    with safe_open(exported["tensor2"], "pt") as f:
        meta = f.metadata()
    assert meta["step"] == str(STEPS) and meta["names"] == "timm" and meta["vitscale_model"] == "vit_tiny_patch16"
    kwargs = json.loads(meta["timm_config"])
    model = timm.models.vision_transformer.VisionTransformer(**kwargs)
    model.load_state_dict(load_file(exported["tensor2"]), strict=True)


def test_whole_model_reshards_to_what_the_tensor_ranks_saved(runs):
    # The reverse: the export, sliced for tensor rank r, is what rank r trained and saved.
    run = load_run(runs / "tensor2")
    folder, _ = find_checkpoint(runs / "tensor2")
    whole = read_checkpoint(folder, run)
    for rank in range(2):
        model = parallelize_vit(run.model.meta(), rank, 2, None)
        saved = torch.load(folder / f"mp_rank_{rank:02d}_model_states.pt", weights_only=True)["module"]
        got = shard_state_dict(whole, model)
        assert sorted(got) == sorted(saved)
        for key in saved:
            assert torch.equal(got[key], saved[key]), key


def test_console_script_writes_atomically_and_reports(runs, tmp_path):
    out = tmp_path / "w" / "vit.pt"
    cmd = [str(BIN / "vitscale-export"), str(runs / "pipe2_tensor2"), "--step", str(STEPS), "--to", "vitscale",
           "--out", str(out)]
    for _ in range(2):  # the second run replaces the first file
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stderr and "pipe 2 x tensor 2" in proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["vit.pt"]  # no temporary file left
    state = torch.load(out, weights_only=True)
    _timm_model().load_state_dict(state, strict=True)


def test_console_script_errors_name_the_fix(runs, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vitscale.tools.export", *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"})

    proc = run(str(runs / "single"), "--step", "7", "--to", "timm", "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and f"step{STEPS:08d}" in proc.stderr  # lists the available checkpoints
    proc = run(str(runs / "single"), "--to", "open_clip", "--out", str(tmp_path / "x.pt"))
    assert proc.returncode == 2 and "not a CLIP" in proc.stderr
    proc = run(str(runs / "single"), "--to", "timm", "--out", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2 and ".safetensors or .pt" in proc.stderr
    assert not list(tmp_path.iterdir())
