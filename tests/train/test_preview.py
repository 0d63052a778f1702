"""The batch preview (``log.preview``, ``train/preview.py``): real tiny runs (one process) write
``preview.png`` whose images are, pixel for pixel, the de-normalised first micro-batch the model
received (captured by a forward hook on the model), with the labels or the decoded captions; the
losses are the same with the preview on and off (with random erasing and Mixup / CutMix, which
draw from the seeded generators); off writes nothing. Image-text canvases (cut and flipped on the
device) and NaViT packed sequences are rendered from ``make_prepare``'s output without a run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY, launch_layouts, train_losses
from vitscale.data.captions import CAPTION_WORDS, CaptionTokenizer
from vitscale.data.packing import pack_batches
from vitscale.data.sources import Batch
from vitscale.data.transforms import crop_resize
from vitscale.experiment import load_experiment
from vitscale.train.batches import make_prepare
from vitscale.train.preview import MAX_TILES, denormalize, label_text, write_preview

CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
FAST = ["data.image_size=32", "model.depth=2", "train.micro_batch=8", "train.global_batch=16", "train.steps=4",
        "log.every=1", "optim.warmup_steps=2", "data.num_workers=0", "checkpoint.at_end=false", "data.source=gratings"]
AUGMENT = ["data.random_erasing=0.5", "data.mixup=0.8", "data.cutmix=1.0"]  # draw from the seeded generators


def train_in_one_process(root: Path, config: str, common: list[str], layouts: dict, timeout: int = 600) -> None:
    """``tests/train/layouts.py`` in one plain process (no launcher): each layout trains to root/name."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, str(ROOT / "tests" / "train" / "layouts.py"), config, str(root), json.dumps(common),
           json.dumps(layouts)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def capture_first_input(run):
    """A layouts.py probe: keep the first forward's inputs (what the model received) and the first
    micro-batch's loss target in run.dir, then train."""
    from vitscale.train.loop import train

    seen, targets, fetch = [], [], run.fetch

    def hook(module, args):
        if not seen:
            seen.append([a.detach().clone() for a in args if isinstance(a, torch.Tensor)])

    def fetch_and_keep():
        inputs, target, keys = fetch()
        if not targets:
            targets.append(target.detach().clone())
        return inputs, target, keys

    run.fetch = fetch_and_keep
    handle = run.engine.module.register_forward_pre_hook(hook)
    train(run)
    handle.remove()
    torch.save(seen[0], Path(run.cfg.run.dir) / "first_input.pt")
    torch.save(targets[0], Path(run.cfg.run.dir) / "first_target.pt")


def _sheet(path: Path):
    """(RGB array, tile boxes, texts) of a preview.png."""
    img = Image.open(path)
    assert img.format == "PNG"
    tiles, texts = json.loads(img.text["vitscale:tiles"]), json.loads(img.text["vitscale:texts"])
    return np.asarray(img.convert("RGB")), tiles, texts


def assert_tiles_show(path: Path, images: torch.Tensor, mean, std) -> None:
    """Every image in the preview is ``images`` (normalised, as the model got them) de-normalised, enlarged."""
    sheet, boxes, _ = _sheet(path)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)  # normalize's inverse, here
    want = ((images.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert len(boxes) == min(len(want), MAX_TILES)
    for (x, y, w, h), pixels in zip(boxes, want):
        scale = w // pixels.shape[1]
        assert scale >= 1 and h == pixels.shape[0] * scale
        tile = sheet[y:y + h:scale, x:x + w:scale]  # one pixel per enlarged block
        assert np.array_equal(tile, pixels), f"tile at ({x}, {y}) differs from the model's input"
        assert np.array_equal(sheet[y:y + h, x:x + w], np.kron(pixels, np.ones((scale, scale, 1), np.uint8)))


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    train_in_one_process(root, TINY, FAST + AUGMENT, {
        "on": {"overrides": [], "call": "tests.train.test_preview:capture_first_input"},
        "off": ["log.preview=false"]})
    return root


def test_preview_is_the_batch_the_model_received(classifier_runs):
    run = classifier_runs / "on"
    (images,) = torch.load(run / "first_input.pt")
    assert images.shape == (8, 3, 32, 32)
    exp = load_experiment(TINY, FAST + AUGMENT)
    assert_tiles_show(run / "preview.png", images, exp.cfg.data.mean, exp.cfg.data.std)
    _, _, texts = _sheet(run / "preview.png")
    target = torch.load(run / "first_target.pt")
    assert target.shape == (8, 10)  # Mixup / CutMix: soft targets, shown as the mixed classes with their weights
    assert texts == [label_text(t) for t in target]
    assert any(" + " in t for t in texts), texts
    for text, t in zip(texts, target):
        assert int(text.split()[0]) == int(t.argmax())


def test_losses_are_the_same_with_the_preview_on_and_off(classifier_runs):
    on, off = train_losses(classifier_runs / "on"), train_losses(classifier_runs / "off")
    assert len(on) == 4 and on == off
    assert not (classifier_runs / "off" / "preview.png").exists()
    assert not list((classifier_runs / "off").glob(".preview.png*"))  # no temporary file left either


@pytest.mark.distributed
def test_a_pipelines_first_stage_writes_the_same_preview(classifier_runs, tmp_path):
    """pipe=2 on 2 processes: rank 0 is the first stage and holds the images; its first micro-batch
    (same samples, same seeded erasing and Mixup) is the one the single process previewed."""
    launch_layouts(tmp_path, 2, {"pipe2": ["parallel.pipe=2"]}, FAST + AUGMENT)
    one, one_boxes, one_texts = _sheet(classifier_runs / "on" / "preview.png")
    two, boxes, texts = _sheet(tmp_path / "pipe2" / "preview.png")
    assert boxes == one_boxes and texts == one_texts
    for x, y, w, h in boxes:
        assert np.array_equal(two[y:y + h, x:x + w], one[y:y + h, x:x + w])
    assert train_losses(tmp_path / "pipe2") == pytest.approx(train_losses(classifier_runs / "off"), rel=1e-5)


def test_clip_preview_has_the_captions(tmp_path):
    overrides = ["train.micro_batch=8", "train.global_batch=8", "train.steps=2", "log.every=1",
                 "data.num_workers=0", "checkpoint.at_end=false"]
    train_in_one_process(tmp_path, CLIP_TINY, overrides,
                         {"clip": {"overrides": [], "call": "tests.train.test_preview:capture_first_input"}})
    images, tokens = torch.load(tmp_path / "clip" / "first_input.pt")
    exp = load_experiment(CLIP_TINY, overrides)
    assert_tiles_show(tmp_path / "clip" / "preview.png", images, exp.cfg.data.mean, exp.cfg.data.std)
    _, _, texts = _sheet(tmp_path / "clip" / "preview.png")
    text = exp.model.text
    tokenizer = CaptionTokenizer(text.vocab_size, text.context_length)
    assert texts == [tokenizer.decode(row) for row in tokens]
    for caption in texts:  # synthetic captions: "a calm dark blue gratings pattern of kind three"
        assert caption.startswith("a ") and " gratings pattern of kind " in caption, caption
        assert all(w in CAPTION_WORDS for w in caption.split())
    assert (tokenizer(texts) == tokens).all()  # decoding is the inverse of the tokenizer


def _synthetic_shards(out: Path) -> Path:
    from functools import partial

    from vitscale.data import shards as sh
    from vitscale.data.synthetic import create_generator

    spec = sh.DatasetSpec(generator="gratings", classes=10, instances=4, seed=3, image_size=32, shard_size=20)
    sh.prepare_out_dir(spec, out)
    sh.write_shards(partial(create_generator, spec.generator, spec.classes, spec.image_size, spec.seed), spec, out,
                    sh.claim_shards(spec, out), 1)
    sh.finish_dataset(spec, out)
    return out


@pytest.mark.parametrize("source", ["laion", "shards"])
def test_shard_sources(source, tmp_path):
    """Real runs on img2dataset image-text shards (canvases cut, resized and flipped on the device) and
    on vitscale-synth shards: the preview shows what the model received, with captions or classes."""
    from vitscale.data.laion_sample import write_laion_sample

    # log.progress=true: the bar's speed is read at a log step before log.warmup_steps end, when laion has
    # written only data records (the bar once took the first record for the throughput one)
    run_overrides = ["train.micro_batch=8", "train.global_batch=8", "train.steps=2", "log.every=1",
                     "log.progress=true", "data.num_workers=0", "checkpoint.at_end=false", "eval.every=0"]
    if source == "laion":
        write_laion_sample(tmp_path / "data", classes=4, instances=16, val_instances=2, size=64, shard_size=32)
        config = str(ROOT / "configs" / "clip_tiny_laion.yaml")
        overrides = run_overrides + [f"data.shards={tmp_path}/data/{{00000..00001}}.tar", "data.hflip=0.5",
                                     "eval.zeroshot=null", "eval.retrieval=null"]
    else:
        config, overrides = TINY, run_overrides + [f"data.source={_synthetic_shards(tmp_path / 'data')}",
                                                   "data.image_size=32", "model.depth=2"]
    train_in_one_process(tmp_path, config, overrides,
                         {"run": {"overrides": [], "call": "tests.train.test_preview:capture_first_input"}})
    received = torch.load(tmp_path / "run" / "first_input.pt")
    exp = load_experiment(config, overrides)
    assert_tiles_show(tmp_path / "run" / "preview.png", received[0], exp.cfg.data.mean, exp.cfg.data.std)
    _, _, texts = _sheet(tmp_path / "run" / "preview.png")
    if source == "laion":
        text = exp.model.text
        tokenizer = CaptionTokenizer(text.vocab_size, text.context_length)
        assert texts == [tokenizer.decode(row) for row in received[1]]
        assert all(" gratings pattern of kind " in t for t in texts), texts
    else:
        assert texts == [str(int(c)) for c in torch.load(tmp_path / "run" / "first_target.pt")]


def test_canvases_cut_and_flipped_on_the_device(tmp_path):
    """Image-text shards (laion): canvases travel whole with their crop boxes; the preview shows the crop."""
    exp = load_experiment(CLIP_TINY, [])
    g = torch.Generator().manual_seed(0)
    canvases = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([[0, 0, 48, 48, 0], [8, 4, 40, 36, 1], [0, 0, 24, 24, 0], [10, 10, 30, 46, 1]],
                         dtype=torch.float32)
    text = exp.model.text
    tokenizer = CaptionTokenizer(text.vocab_size, text.context_length)
    captions = ["a calm dark blue gratings pattern of kind one", "a soft red fractal pattern of kind two",
                "a bold bright green perlin pattern of kind three", "a faint grey rcdb pattern of kind four"]
    inputs, target = make_prepare(exp, torch.device("cpu"), torch.float32)(
        Batch(images=canvases, tokens=tokenizer(captions), boxes=boxes))
    write_preview(tmp_path / "preview.png", inputs, target, exp.cfg.data.mean, exp.cfg.data.std, tokenizer=tokenizer)
    assert_tiles_show(tmp_path / "preview.png", inputs[0], exp.cfg.data.mean, exp.cfg.data.std)
    _, _, texts = _sheet(tmp_path / "preview.png")
    assert texts == captions
    cut = crop_resize(canvases.permute(0, 3, 1, 2), boxes, 32)  # the flipped crop, not the canvas
    want = cut.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = denormalize(inputs[0], exp.cfg.data.mean, exp.cfg.data.std)
    assert np.abs(want.astype(int) - got.astype(int)).max() <= 1


def test_packed_sequences_are_put_back_into_images(tmp_path):
    """NaViT: the preview rebuilds each packed image from its patches and coords."""
    exp = load_experiment(TINY, ["data.image_size=32", "model.patch_size=8", "model.pos_embed=factorized",
                                 "model.class_token=false", "model.global_pool=avg", "data.packing.seq_len=40",
                                 "data.packing.max_images=3"])
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([3, 1, 4, 1])
    patches, coords, segments, packed_labels = next(pack_batches([(images, labels)], 2, patch_size=8, seq_len=40,
                                                                 max_images=3, max_size=32))
    inputs, target = make_prepare(exp, torch.device("cpu"), torch.float32)(
        Batch(labels=packed_labels, patches=patches, coords=coords, segments=segments))
    write_preview(tmp_path / "preview.png", inputs, target, exp.cfg.data.mean, exp.cfg.data.std, patch_size=8)
    sheet, boxes, texts = _sheet(tmp_path / "preview.png")
    assert len(boxes) == 4 and texts == ["3", "1", "4", "1"]  # 2 images per 40-token sequence (16 patches each)
    for (x, y, w, h), image in zip(boxes, images):
        scale = w // 32
        assert np.array_equal(sheet[y:y + h:scale, x:x + w:scale], image.permute(1, 2, 0).numpy())


def test_label_text():
    assert label_text(torch.tensor(7)) == "7"
    assert label_text(torch.tensor(2), ["cat", "dog", "fish"]) == "2 fish"
    assert label_text(torch.tensor([0.0, 0.7, 0.0, 0.3])) == "1 (0.70) + 3 (0.30)"
    assert label_text(torch.tensor([0.0, 1.0, 0.0])) == "1 (1.00)"
    assert label_text(torch.tensor([0.01, 0.91, 0.01] + [0.01] * 7)) == "1 (0.91)"  # label smoothing's floor left out


def test_a_large_micro_batch_shows_its_first_images(tmp_path):
    images = torch.randn(40, 3, 16, 16)
    write_preview(tmp_path / "preview.png", (images,), torch.arange(40) % 10, [0.5] * 3, [0.5] * 3)
    sheet, boxes, texts = _sheet(tmp_path / "preview.png")
    assert len(boxes) == MAX_TILES == 32 and texts == [str(i % 10) for i in range(32)]
    assert_tiles_show(tmp_path / "preview.png", images, [0.5] * 3, [0.5] * 3)
