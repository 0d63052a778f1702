"""The batch preview (``log.preview``): at the start of a run global rank 0 writes
``run.dir/preview.png``, the first micro-batch exactly as the model receives it: after the
device-side crop / resize / flip, normalisation and DeiT's random erasing / Mixup / CutMix,
de-normalised with ``data.mean`` / ``data.std``, each image with its label (class index, and
name where the data has names; Mixup's soft targets as their two largest classes) or its caption
(a CLIP's tokens decoded with the tokenizer). A wrong augmentation, a broken shard or captions
that do not match their images show before hours are spent.

It costs no extra pass over the data and draws no random numbers: ``previewed`` wraps the
batch preparation and renders the first prepared micro-batch it returns (which the model then
trains on as it would have), so training is the same with the preview on and off. Rank 0 reads
data in every layout (a pipeline's first stage). The file is written atomically; its PNG text
chunks ``vitscale:tiles`` (x, y, width, height of each image in the picture) and
``vitscale:texts`` (what is written under each) say what is where.
"""
from __future__ import annotations

import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vitscale.data.captions import CaptionTokenizer
from vitscale.data.downstream import class_names_of
from vitscale.experiment import Experiment
from vitscale.files import replacing

logger = logging.getLogger(__name__)

MAX_TILES = 32  # images shown (the first of the micro-batch): 4 rows, a few MB of PNG at 224 px
COLUMNS = 8
MIN_SIDE = 128  # smaller images are enlarged by a whole factor, nearest neighbour: every pixel stays as it was
PAD = 6
FONT_SIZE = 11
TEXT_LINES = 4  # lines of label or caption under an image; longer ones end in "..."


@dataclass
class Tile:
    pixels: np.ndarray  # uint8 (H, W, 3)
    text: str


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, C, H, W) (any float dtype, any device) -> uint8 (B, H, W, 3): the inverse of
    ``data.transforms.normalize``, rounded and clipped to [0, 255] (grey images repeated to RGB)."""
    x = images.detach().to("cpu", torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((x * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def unpack(patches: torch.Tensor, coords: torch.Tensor, segments: torch.Tensor, patch_size: int,
           mean: Sequence[float], std: Sequence[float]) -> list[tuple[int, int, np.ndarray]]:
    """Packed sequences (NaViT) -> (sequence, image slot 0.., uint8 (h, w, 3) image) per packed image,
    its patches put back on its grid (dropped tokens stay black)."""
    p, channels = patch_size, len(mean)
    B, L, _ = patches.shape
    x = patches.detach().to("cpu", torch.float32).view(B * L, channels, p, p)
    pixels = denormalize(x, mean, std).reshape(B, L, p, p, 3)
    coords, segments = coords.cpu(), segments.cpu()
    images = []
    for b in range(B):
        for k in sorted(int(s) for s in segments[b].unique() if s > 0):
            where = (segments[b] == k).nonzero().flatten()
            rc = coords[b, where]
            canvas = np.zeros(((int(rc[:, 0].max()) + 1) * p, (int(rc[:, 1].max()) + 1) * p, 3), np.uint8)
            for (r, c), token in zip(rc.tolist(), where.tolist()):
                canvas[r * p:(r + 1) * p, c * p:(c + 1) * p] = pixels[b, token]
            images.append((b, k - 1, canvas))
    return images


def label_text(target: torch.Tensor, names: list[str] | None = None) -> str:
    """A class index (``"3"``, ``"3 cat"`` with names) or a soft target's two largest classes with
    their weights (Mixup / CutMix: ``"3 (0.70) + 5 (0.30)"``)."""
    def name(i: int) -> str:
        return f"{i} {names[i]}" if names and 0 <= i < len(names) else str(i)

    if target.ndim == 0:
        return name(int(target))
    weights, classes = target.float().topk(min(2, target.numel()))
    return " + ".join(f"{name(int(c))} ({float(w):.2f})" for i, (w, c) in enumerate(zip(weights, classes))
                      if i == 0 or w >= 0.05)  # not label smoothing's floor


def tiles(inputs: tuple, target: torch.Tensor, mean: Sequence[float], std: Sequence[float], patch_size: int = 16,
          tokenizer: CaptionTokenizer | None = None, names: list[str] | None = None) -> tuple[list[Tile], str]:
    """The images of a prepared micro-batch (``batches.make_prepare``'s model inputs and target) with
    their labels or captions, and a phrase saying what the micro-batch held."""
    if len(inputs) == 3:  # packed sequences: (patches, coords, segments); labels (B, K), -1 = empty slot
        found = unpack(*inputs, patch_size, mean, std)
        shown = [Tile(pixels, label_text(target[b, k].cpu(), names)) for b, k, pixels in found[:MAX_TILES]]
        return shown, f"{len(found)} images packed into {inputs[0].shape[0]} sequences"
    images = inputs[0]
    n = images.shape[0]
    pixels = denormalize(images[:MAX_TILES], mean, std)
    if len(inputs) == 2:  # a CLIP: (images, tokens)
        if tokenizer is None:
            raise ValueError("a CLIP's preview needs the tokenizer to decode its captions")
        texts = [tokenizer.decode(row) for row in inputs[1][:MAX_TILES].cpu()]
    else:
        texts = [label_text(t, names) for t in target[:MAX_TILES].cpu()]
    size = f"{images.shape[-2]}x{images.shape[-1]} px"
    return [Tile(p, t) for p, t in zip(pixels, texts)], f"{n} images of {size}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable (FreeType); Pillow >= 10.1
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    """``text`` in at most ``lines`` lines no wider than ``width`` pixels; a cut line ends in '...'."""
    chars = max(4, int(width / max(font.getlength("n"), 1)))
    out = textwrap.wrap(text, chars) or [""]
    while any(font.getlength(line) > width for line in out) and chars > 4:
        chars -= 1
        out = textwrap.wrap(text, chars)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:max(0, chars - 3)].rstrip() + "..."
    return out


def render(shown: list[Tile], header: str):
    """A white sheet: the header, then the images in rows of ``COLUMNS`` (enlarged by a whole factor
    up to ``MIN_SIDE``), each with its text below. Returns (PIL image, [x, y, width, height] per image)."""
    from PIL import Image, ImageDraw

    font = _font(FONT_SIZE)
    line_h = FONT_SIZE + 3
    height = max(t.pixels.shape[0] for t in shown)
    width = max(t.pixels.shape[1] for t in shown)
    scale = max(1, MIN_SIDE // max(height, width))
    cell_w, cell_h = max(width * scale, 64), height * scale
    cols = min(COLUMNS, len(shown))
    rows = math.ceil(len(shown) / cols)
    sheet_w = PAD + cols * (cell_w + PAD)
    head = _wrap(header, font, sheet_w - 2 * PAD, 6)
    texts = [_wrap(t.text, font, cell_w, TEXT_LINES) for t in shown]
    text_h = line_h * max(len(t) for t in texts) + 2
    top = PAD + line_h * len(head) + PAD
    sheet = Image.new("RGB", (sheet_w, top + rows * (cell_h + text_h + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(head):
        draw.text((PAD, PAD + i * line_h), line, fill="black", font=font)
    boxes = []
    for i, (tile, lines) in enumerate(zip(shown, texts)):
        x, y = PAD + (i % cols) * (cell_w + PAD), top + (i // cols) * (cell_h + text_h + PAD)
        h, w = tile.pixels.shape[:2]
        sheet.paste(Image.fromarray(tile.pixels).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + 1 + j * line_h), line, fill="black", font=font)
        boxes.append([x, y, w * scale, h * scale])
    return sheet, boxes


def write_preview(path: str | Path, inputs: tuple, target: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  patch_size: int = 16, tokenizer: CaptionTokenizer | None = None,
                  names: list[str] | None = None) -> Path:
    """Render a prepared micro-batch (model inputs, target) to ``path`` (PNG), atomically."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    shown, held = tiles(inputs, target, mean, std, patch_size, tokenizer, names)
    if not shown:
        raise ValueError("the first micro-batch holds no image")
    what = "its caption" if len(inputs) == 2 else "its class" + (" (Mixup / CutMix weights)" if target.ndim == 2
                                                                   and len(inputs) == 1 else "")
    header = (f"{path.parent.name}: the first micro-batch as the model receives it ({held}; the first "
              f"{len(shown)} shown), after the device-side crop / resize / augmentation, de-normalised with "
              f"mean {list(mean)} std {list(std)}; under each image {what}")
    sheet, boxes = render(shown, header)
    info = PngInfo()
    info.add_text("vitscale:tiles", json.dumps(boxes))
    info.add_text("vitscale:texts", json.dumps([t.text for t in shown]))
    with replacing(path) as tmp:
        sheet.save(tmp, format="PNG", pnginfo=info)
    return path


def previewed(prepare: Callable, path: str | Path, exp: Experiment) -> Callable:
    """``prepare`` (``batches.make_prepare``) that also writes the first micro-batch it prepares to
    ``path``; what it returns is unchanged. A preview that cannot be written is warned about, and
    the run goes on."""
    d, text = exp.cfg.data, exp.model.text
    tokenizer = CaptionTokenizer(text.vocab_size, text.context_length) if text is not None else None
    names = class_names_of(d.source) if exp.source == "downstream" and d.source else None
    patch_size = getattr(exp.model.arch, "patch_size", 16)
    pending = True

    def prepare_and_preview(batch) -> tuple:
        nonlocal pending
        out = prepare(batch)
        if pending:
            pending = False
            try:
                write_preview(path, *out, d.mean, d.std, patch_size, tokenizer, names)
            except Exception as e:  # a picture must not stop a run that would train
                logger.warning("no batch preview written to %s: %s: %s", path, type(e).__name__, e)
            else:
                logger.info("batch preview: %s", path)
        return out

    return prepare_and_preview
