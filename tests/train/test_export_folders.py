"""vitscale-export --out DIR: folders timm and open_clip open with one call (issue 26).

A tiny ViT classifier, a tiny CLIP and a SigLIP CLIP (three single-process runs, one
module-scoped fixture, trained with a mean / std unlike either library's default) are
exported as folders and opened with the libraries' own loaders (``timm.create_model("local-dir:...")``
and by architecture name with ``pretrained_cfg_overlay``; ``open_clip.create_model_and_transforms``
and ``open_clip.get_tokenizer`` on ``local-dir:``). Their outputs on random images (and, for the
CLIPs, on captions through their own tokenizer) equal our model's within 1e-5, and their
preprocessing has our image size, mean and std. The export bars go to stderr, never stdout, and
``vitscale-eval``'s stdout stays one JSON object with its bars on.
"""
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import timm
import torch

from tests.conftest import ROOT, run_training
from vitscale.data.captions import CaptionTokenizer, class_phrase, describe
from vitscale.tools import eval as eval_tool
from vitscale.train.evaluate import load_checkpoint_model
from vitscale.train.export import export_run

pytestmark = pytest.mark.distributed

CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
COMMON = ["train.steps=2", "checkpoint.at_end=true", "data.num_workers=0", "train.precision=fp32",
          "log.progress=false", "log.every=1", "parallel.zero=0", f"data.mean={MEAN}", f"data.std={STD}",
          "train.seed=7"]
VIT = COMMON + ["model.depth=2", "data.source=gratings", "train.micro_batch=4", "train.global_batch=4"]
CLIP = COMMON + ["train.micro_batch=8", "train.global_batch=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_folder_runs")
    run_training(root / "vit", VIT, launcher="python", nprocs=1)
    run_training(root / "clip", CLIP, launcher="python", nprocs=1, config=CLIP_TINY)
    run_training(root / "siglip", CLIP + ["train.loss=siglip"], launcher="python", nprocs=1, config=CLIP_TINY)
    return root


def test_timm_folder_opens_with_one_call_and_computes_what_our_model_computes(runs, tmp_path):
    out = tmp_path / "vit_export"
    result = export_run(runs / "vit", out, to="timm")
    assert result.path == out and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["vit_export"]  # no temporary folder left
    cfg = json.loads((out / "config.json").read_text())
    ours, run = load_checkpoint_model(runs / "vit")
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    args = {k: v for k, v in cfg["model_args"].items() if k != "num_classes"}
    weights = str(out / "model.safetensors")
    # By architecture name: with the folder's pretrained_cfg (our head, mean / std) ...
    by_name = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                                pretrained_cfg_overlay={**cfg["pretrained_cfg"], "file": weights}, **args).eval()
    # ... or, to fine-tune, only the file and a new head: the backbone is ours, the head new.
    finetune = timm.create_model(cfg["architecture"], pretrained=True, num_classes=5,
                                 pretrained_cfg_overlay=dict(file=weights), **args).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
        for model in (by_dir, by_name):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        features = ours.forward_head(ours.forward_features(x), True)
        torch.testing.assert_close(finetune.forward_head(finetune.forward_features(x), pre_logits=True), features,
                                   rtol=1e-5, atol=1e-5)
        assert finetune(x).shape == (3, 5)
    data = timm.data.resolve_data_config({}, model=by_dir)
    assert data["input_size"] == (3, run.cfg.data.image_size, run.cfg.data.image_size) == (3, 64, 64)
    assert list(data["mean"]) == MEAN == list(run.cfg.data.mean) and list(data["std"]) == STD
    assert (data["interpolation"], data["crop_pct"]) == ("bicubic", 0.875)  # our classifier evaluation's
    assert cfg["num_classes"] == by_dir.num_classes == run.cfg.data.num_classes


def _captions(context_length: int) -> list[str]:
    """Captions as training sees them, class prompts, and one longer than the context."""
    rng = np.random.default_rng(0)
    out = [describe("gratings", label, label * 3, 7, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
           for label in (0, 3, 7, 12)]
    out += [f"a {class_phrase('fractal', 5)}", "a fractal", "A  Calm  FRACTAL"]
    out.append(" ".join(["busy dark red"] * context_length))  # cut, keeping the end of text last
    return out


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_open_clip_folder_opens_with_one_call_and_computes_what_our_model_computes(runs, tmp_path, name):
    out = tmp_path / "oc"
    export_run(runs / name, out, to="open_clip")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    ours, run = load_checkpoint_model(runs / name)
    text = run.model.text
    ours_tok = CaptionTokenizer(text.vocab_size, text.context_length)
    assert (model.logit_bias is not None) == (name == "siglip") == (ours.logit_bias is not None)

    captions = _captions(text.context_length)
    tokens, their_tokens = ours_tok(captions), tokenizer(captions)
    assert their_tokens.shape == tokens.shape == (len(captions), text.context_length)
    assert tokenizer.context_length == text.context_length
    # End of text in the same place (the last position for the caption cut at the context length).
    assert torch.equal((their_tokens == tokenizer.eot_token_id).int().argmax(-1), tokens.argmax(-1))
    assert tokens.argmax(-1)[-1] == text.context_length - 1
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pair = tokens[:4], their_tokens[:4]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ours.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(their_tokens), ours.encode_text(tokens), rtol=1e-5, atol=1e-5)
        mine, theirs = ours(images, pair[0]), model(images, pair[1])
        logits = mine[2] * mine[0] @ mine[1].T + (mine[3] if name == "siglip" else 0)
        their_logits = theirs[2] * theirs[0] @ theirs[1].T + (theirs[3] if name == "siglip" else 0)
    torch.testing.assert_close(their_logits, logits, rtol=1e-5, atol=1e-5)
    if name == "siglip":
        assert model.logit_bias.item() == pytest.approx(ours.logit_bias.item()) != -10.0  # trained, carried over

    d = run.cfg.data
    cfg = model.visual.preprocess_cfg
    size = tuple(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    written = json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert size == (d.image_size, d.image_size) == (32, 32) and written["size"] == 32
    assert (list(cfg["mean"]), list(cfg["std"])) == (MEAN, STD) == (list(d.mean), list(d.std))
    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    assert (list(normalize.mean), list(normalize.std)) == (MEAN, STD)
    from PIL import Image

    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_export_rewrites_a_folder_whole_and_says_which_format_fits(runs, tmp_path):
    out = tmp_path / "x"
    export_run(runs / "vit", out, to="timm")
    (out / "stale.txt").write_text("from before")
    export_run(runs / "vit", out, to="timm")  # replaced as a whole
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    for run, to, message in [("clip", "timm", "use --to open_clip"), ("vit", "open_clip", "not a CLIP"),
                             ("vit", "vitscale", "folders are for --to timm / open_clip")]:
        with pytest.raises(ValueError, match=message):
            export_run(runs / run, tmp_path / "new", to=to)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_console_script_bars_go_to_stderr_and_stdout_stays_empty(runs, tmp_path):
    out = tmp_path / "oc"
    proc = subprocess.run([sys.executable, "-m", "vitscale.tools.export", str(runs / "clip"), "--to", "open_clip",
                           "--out", str(out), "--progress"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "export: reading" in proc.stderr and "export: tensors" in proc.stderr and f"wrote {out}" in proc.stderr
    # without --progress and without a terminal: no bar
    proc = subprocess.run([sys.executable, "-m", "vitscale.tools.export", str(runs / "clip"), "--to", "open_clip",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0 and "export: reading" not in proc.stderr and proc.stdout == ""


def test_eval_bars_leave_stdout_one_json_object(runs, tmp_path, capsys):
    from vitscale.tools import synth

    assert synth.main(["laion-sample", "--out", str(tmp_path / "ls"), "--instances", "4", "--val-instances", "3",
                       "--size", "32"]) == 0
    capsys.readouterr()
    assert eval_tool.main([str(runs / "clip"), "--task", "zeroshot", "--data", str(tmp_path / "ls" / "val"),
                           "--device", "cpu", "--progress", "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # the whole of stdout
    # 30 rows, one of them a failed download as img2dataset records it: 29 in the shard
    assert result["task"] == "zeroshot" and result["samples"] == 29
    assert "eval: zeroshot" in captured.err and "| 29/29 [" in captured.err  # the total from _stats.json
