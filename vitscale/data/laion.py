"""Image-text shards in img2dataset's format -> (uint8 images, token ids, crop boxes) micro-batches.

img2dataset writes one tar per shard with ``{key}.jpg`` (or .png / .webp), ``{key}.txt``
(the caption) and ``{key}.json`` (url, width, height, original_width, original_height,
similarity, ... and any column it was asked to keep), beside ``{shard}.parquet`` (every
row, failed downloads included) and ``{shard}_stats.json`` (``successes`` = the samples in
the tar). webdataset opens the shards (``gopen``: local paths, ``pipe:`` and http URLs;
brace patterns expand as in webdataset); the tar
members are parsed by our ``tars.read_tar_samples`` (Python's ``tarfile``, under
webdataset's own reader, costs as much per sample as the JPEG decode). The rest is ours,
because three things a run at scale needs are in neither webdataset nor open_clip:

1. **Splitting by data-parallel rank.** Ranks of one tensor-parallel group (and the first
   and last stage of a pipeline) pass the same ``data_rank`` and read identical batches.
   webdataset's ``split_by_node`` reads the global ``RANK`` whenever it is set.
2. **The same number of batches on every data rank in every epoch** (uneven shards make
   webdataset/open_clip ranks run dry at different times and hang a collective):
   every loader worker yields a fixed quota of batches per epoch.

   - ``resampled`` (the open_clip way): each worker draws shards with replacement (a
     source with probability proportional to its weight, then a shard of it uniformly)
     and an epoch is ``epoch_samples`` samples over all data ranks.
   - exact epochs: each epoch permutes all shards (seeded), lays their samples end to end
     (sizes from ``_stats.json`` / ``sizes.json``, never guessed) and gives every worker
     of every data rank a contiguous range of exactly its quota: each sample is read once
     per epoch by one worker; the last ``< data_world * micro_batch`` samples of the
     epoch's order are left out (as ``DistributedSampler(drop_last=True)``). A range that
     yields fewer good samples than its quota (bad or filtered samples) is read again to
     fill it, and the repeats are counted.
3. **An exact position, seeked to.** Each batch carries its worker's position (epoch, batches
   yielded, samples taken, and the place of the last one: its shuffle block, the cursor of
   the block's first raw sample (shard, sample in the shard), its offset in the block, the
   de-duplication window as the block began) and cumulative counters;
   ``LaionLoader.state_dict()`` is what the checkpoint stores. On resume each worker seeks to
   the block's first sample (``tar_index``: each shard's sample offsets, built lazily and
   cached beside it as JSON), reads that one block again without decoding, and continues with
   the sample it would have decoded next: a resumed run sees the keys an uninterrupted one
   would, and reads at most one block (``shuffle_buffer`` raw samples) to get there, wherever
   in the epoch it stopped (``benchmarks/resume_seek.py``). Shuffling is therefore by blocks
   of ``shuffle_buffer`` raw samples (``LaionStream._pass``). The DataLoader's round-robin
   over workers resumes at the right worker.

Metadata filters (``FILTER_KEYS``) and key/URL de-duplication run before any image is
decoded. Samples that cannot be read (a truncated or unreadable tar), lack a caption or
image, or fail to decode are skipped and counted by reason; they never stop the run.

Images leave the workers as uint8 channels-last on a fixed square *canvas* (no
resampling in the worker for images that fit; a JPEG of exactly the canvas size is
decoded straight into the batch), each with a crop box (x0, y0, x1, y1, flip) drawn in the
worker: a random resized crop for training (open_clip: scale 0.9-1, no flip), the
central square for evaluation. ``vitscale.data.transforms.crop_resize`` cuts and
resizes all boxes of a batch in one call on the device: a worker then costs little more
than its JPEG decode (``benchmarks/loader_speed.py``).
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data.tars import expand, is_remote, read_tar_samples
from vitscale.data.synthetic_loader import ratio_clamped_box

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JPEG_EXTS = ("jpg", "jpeg")
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit; larger images count as bad
FILTER_KEYS = {
    "min_image_size": "smaller side of the original image (json original_width/height, else width/height) >= value",
    "min_caption_words": "caption has at least this many words",
    "max_caption_words": "caption has at most this many words",
    "min_similarity": "json 'similarity' (LAION's CLIP image-text cosine) >= value",
    "where": "list of 'FIELD OP NUMBER' on numeric json fields, OP one of < <= > >= == !=",
    "dedupe": "'url' or 'key': drop a sample whose url / key was seen among the last dedupe_window samples",
    "dedupe_window": "samples remembered for dedupe (default: the shuffle buffer, at least 1000)",
}
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
_WHERE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(-?[\d.]+(?:[eE][-+]?\d+)?)\s*$")
# Counter names, in report order.
BAD = ("read_error", "missing_image", "missing_caption", "decode_error")
COUNTERS = ("read", "kept", "filtered", "duplicate", *BAD, "repeated", "resized")
UNSHUFFLED_BLOCK = 1000  # raw samples per block without shuffling (evaluation): a resume reads at most one


# -- sources and sizes ------------------------------------------------------------------------------

@dataclass
class Source:
    """One entry of ``data.shards``: its shard URLs, mixing weight and per-shard sizes."""
    pattern: str
    urls: list[str]
    weight: float = 1.0
    sizes: list[int] | None = None  # samples per shard, None where unknown

    @property
    def num_samples(self) -> int | None:
        return sum(self.sizes) if self.sizes is not None else None


def _shard_size(url: str, sizes_json: dict | None) -> int | None:
    """Samples in a local shard: ``sizes.json`` beside it ({name: count}) or img2dataset's
    ``{stem}_stats.json`` (``successes``)."""
    name = os.path.basename(url)
    if sizes_json is not None and name in sizes_json:
        return int(sizes_json[name])
    stem = url[:-len(".tar")] if url.endswith(".tar") else url
    stats = Path(stem + "_stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    return None


def _read_sizes(path: str | None, folder: str) -> dict | None:
    candidate = Path(path) if path else Path(folder or ".") / "sizes.json"
    if candidate.is_file():
        return json.loads(candidate.read_text())
    if path:
        raise ValueError(f"data.shards: sizes file {path} does not exist")
    return None


def resolve_sources(shards: Any, sizes: bool = True) -> list[Source]:
    """``data.shards`` (a brace pattern, a list of them, or a list of {pattern, weight[, sizes]})
    -> sources with URLs and, with ``sizes``, the samples per shard where known (a ``sizes``
    entry names a sizes.json, e.g. for ``pipe:`` URLs whose folder cannot be read).

    Every rank calls this at start-up, so it touches few files: the first and last shard
    of a pattern are checked (a wrong folder or range shows there; a hole in between is a
    read error, counted, when it is read), and sizes are read only when asked for (exact
    epochs): one ``sizes.json`` per folder is cheaper than a ``_stats.json`` per shard.

    Raises:
        ValueError: an entry matches nothing, a checked shard is missing, a weight is not positive.
    """
    if shards is None:
        raise ValueError("data.source=laion needs data.shards: a brace pattern such as "
                         "/data/laion/{00000..01023}.tar, a list of them, or a list of {pattern, weight}")
    entries = [shards] if isinstance(shards, (str, os.PathLike, dict)) else list(shards)
    sources = []
    for entry in entries:
        spec = dict(entry) if isinstance(entry, dict) else {"pattern": str(entry)}
        unknown = set(spec) - {"pattern", "weight", "sizes"}
        if unknown or "pattern" not in spec:
            raise ValueError(f"data.shards entry {entry!r}: use {{pattern: ..., weight: ..., sizes: ...}} "
                             f"(unknown keys {sorted(unknown)})" if unknown else
                             f"data.shards entry {entry!r} has no 'pattern'")
        pattern, weight = str(spec["pattern"]), float(spec.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.shards entry {pattern!r}: weight must be positive, got {weight}")
        if not is_remote(pattern) and os.path.isdir(pattern):
            urls = sorted(str(p) for p in Path(pattern).glob("*.tar"))
        else:
            urls = expand(pattern)
        if not urls:
            raise ValueError(f"data.shards entry {pattern!r} matches no shard")
        ends = {urls[0], urls[-1]}
        missing = sorted(u for u in ends if not is_remote(u) and not os.path.isfile(u))
        if missing:
            raise ValueError(f"data.shards entry {pattern!r}: shard {missing[0]} does not exist")
        sources.append(Source(pattern, urls, weight, _sizes(urls, spec.get("sizes")) if sizes else None))
    return sources


def _sizes(urls: list[str], sizes_file: str | None) -> list[int] | None:
    by_folder: dict[str, dict | None] = {}
    out = []
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in by_folder:
            by_folder[folder] = _read_sizes(sizes_file, folder) if (sizes_file or not is_remote(url)) else None
        size = (None if is_remote(url) and by_folder[folder] is None else _shard_size(url, by_folder[folder]))
        if size is None:
            return None
        out.append(size)
    return out


# -- reading tars -----------------------------------------------------------------------------------

def read_shards(urls, counts: dict, key: str = "read_error", start: int = 0) -> Iterator[dict]:
    """Raw samples of the shards ``urls``, in order (the first from its sample ``start``, seeked
    to); an unreadable or truncated shard is counted once in ``counts[key]``, logged, and the
    stream moves on to the next shard."""
    for i, url in enumerate(urls):
        try:
            yield from read_tar_samples(url, start if i == 0 else 0)
        except (OSError, ValueError, EOFError) as exc:
            counts[key] = counts.get(key, 0) + 1
            logger.warning("skipping the rest of shard %s: %s", url, exc)


# -- filters ----------------------------------------------------------------------------------------

def check_filters(filters: dict | None) -> dict:
    """Validated ``data.filters`` (``FILTER_KEYS``); raises ValueError naming the bad entry."""
    filters = dict(filters or {})
    for key in filters:
        if key not in FILTER_KEYS:
            raise ValueError(f"data.filters.{key} is not a filter; known: "
                             + "; ".join(f"{k} ({v})" for k, v in FILTER_KEYS.items()))
    for key in ("min_image_size", "min_caption_words", "max_caption_words", "min_similarity", "dedupe_window"):
        if key in filters and (isinstance(filters[key], bool) or not isinstance(filters[key], (int, float))):
            raise ValueError(f"data.filters.{key} must be a number, got {filters[key]!r}")
    if filters.get("dedupe") not in (None, "url", "key"):
        raise ValueError(f"data.filters.dedupe must be 'url' or 'key', got {filters['dedupe']!r}")
    where = filters.get("where") or []
    where = [where] if isinstance(where, str) else list(where)
    for clause in where:
        if not isinstance(clause, str) or not _WHERE.match(clause):
            raise ValueError(f"data.filters.where entry {clause!r}: write 'FIELD OP NUMBER', e.g. 'punsafe < 0.5' "
                             f"(OP one of {' '.join(_OPS)})")
    filters["where"] = where
    return filters


class SampleFilter:
    """Decides, from a sample's caption and json alone, whether it is kept (``reason`` None),
    filtered or a duplicate. Stateful only for de-duplication (a window of recent ids)."""

    def __init__(self, filters: dict | None, default_window: int = 1000):
        f = check_filters(filters)
        self.min_size, self.min_sim = f.get("min_image_size"), f.get("min_similarity")
        self.min_words, self.max_words = f.get("min_caption_words"), f.get("max_caption_words")
        self.where = [(m.group(1), _OPS[m.group(2)], float(m.group(3))) for m in map(_WHERE.match, f["where"])]
        self.dedupe = f.get("dedupe")
        self.window = int(f.get("dedupe_window") or max(1000, default_window))
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self.needs_json = bool(self.min_size or self.min_sim is not None or self.where or self.dedupe == "url")
        # Whether any filter applies (``reason`` is skipped per sample when none does).
        self.active = bool(self.needs_json or self.dedupe or self.min_words is not None or self.max_words is not None)

    def state(self) -> list | None:
        """The de-duplication window, oldest first (None without de-duplication)."""
        return list(self._recent) if self.dedupe else None

    def load_state(self, recent: list | None) -> None:
        self._recent = collections.OrderedDict.fromkeys(recent or ())

    def reason(self, caption: str, meta: dict | None, key: str) -> str | None:
        if self.min_words is not None or self.max_words is not None:
            words = len(caption.split())
            if (self.min_words is not None and words < self.min_words) or (
                    self.max_words is not None and words > self.max_words):
                return "filtered"
        if self.needs_json and meta is None:
            return "filtered"  # nothing to test the metadata filters on
        if self.min_size:
            w = meta.get("original_width") or meta.get("width")
            h = meta.get("original_height") or meta.get("height")
            if w is None or h is None or min(w, h) < self.min_size:
                return "filtered"
        if self.min_sim is not None and not (meta.get("similarity") or -math.inf) >= self.min_sim:
            return "filtered"
        for name, op, value in self.where:
            got = meta.get(name)
            if not isinstance(got, (int, float)) or isinstance(got, bool) or not op(got, value):
                return "filtered"
        if self.dedupe:
            ident = key if self.dedupe == "key" else meta.get("url")
            if ident is not None:
                if ident in self._recent:
                    return "duplicate"
                self._recent[ident] = None
                if len(self._recent) > self.window:
                    self._recent.popitem(last=False)
        return None


# -- decoding ---------------------------------------------------------------------------------------

def decode_image(data: bytes, ext: str, canvas: int) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB. JPEGs go through simplejpeg (libjpeg-turbo; faster
    than PIL and torchvision.io here, see benchmarks/loader_speed.py), decoded at a reduced
    DCT scale when the image is at least twice the canvas; PNG / WebP / odd JPEGs through PIL."""
    if ext in JPEG_EXTS:
        import simplejpeg

        try:
            w, h, _, _ = simplejpeg.decode_jpeg_header(data)
            if w * h > MAX_PIXELS:
                raise ValueError(f"{w} x {h} pixels is over the limit of {MAX_PIXELS}")
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=canvas, min_width=canvas)
        except ValueError as exc:
            if "over the limit" in str(exc):
                raise
            # CMYK / unusual JPEGs: PIL below.
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width} x {img.height} pixels is over the limit of {MAX_PIXELS}")
        return np.asarray(img.convert("RGB"))


def fit_canvas(image: np.ndarray, canvas: int) -> tuple[np.ndarray, bool]:
    """An (H, W, 3) image that fits a ``canvas`` square: unchanged when both sides fit;
    otherwise the shorter side is brought to ``canvas`` (antialiased bilinear, uint8) if
    larger, and the longer side centre-cropped. Returns (image, whether it was resized)."""
    h, w = image.shape[:2]
    resized = False
    if min(h, w) > canvas:
        scale = canvas / min(h, w)
        size = (max(canvas, round(h * scale)), max(canvas, round(w * scale)))
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        # torch's uint8 antialiased path (AVX2) is ~3x faster than PIL's resize here.
        image = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
        h, w, resized = size[0], size[1], True
    top, left = max(0, (h - canvas) // 2), max(0, (w - canvas) // 2)
    return image[top:top + canvas, left:left + canvas], resized


def decode_to_canvas(sample: dict, slot: np.ndarray) -> tuple[int, int, bool]:
    """Decode ``sample``'s image into ``slot`` ((canvas, canvas, 3) uint8, channels last) at its
    top-left, zeros around it. A JPEG of exactly the canvas size (img2dataset's resized
    output) is decoded straight into the slot, without a copy. Returns (height, width,
    whether it was resized to fit)."""
    canvas = slot.shape[0]
    ext = "jpg" if "jpg" in sample else next(e for e in IMAGE_EXTS if e in sample)
    data = sample[ext]
    if ext in JPEG_EXTS:
        import simplejpeg

        w, h, _, _ = simplejpeg.decode_jpeg_header(data)
        if w == h == canvas:
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=slot)
            return h, w, False
    image, resized = fit_canvas(decode_image(data, ext, canvas), canvas)
    h, w = image.shape[:2]
    slot[:h, :w] = image
    slot[h:] = 0
    slot[:h, w:] = 0
    return h, w, resized


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square (CLIP's eval transform: resize the shorter side, centre crop)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


# -- the per-worker stream ----------------------------------------------------------------------------

class SampleRng:
    """A tiny seeded generator (splitmix64) with the ``random.Random`` methods a crop needs:
    seeding one per sample costs a microsecond, ``random.Random(seed)`` ten."""

    __slots__ = ("state",)
    _MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self._MASK

    def _next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        return (self._next() >> 11) * (1.0 / (1 << 53))

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return a + self._next() % (b - a + 1)


_MASK64, _GOLDEN64 = (1 << 64) - 1, 0x9E3779B97F4A7C15


def _mix64(z: int) -> int:
    """splitmix64's output function (``SampleRng._next`` after its state step)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def train_box(seed: int, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
              hflip: float) -> tuple[int, int, int, int, bool]:
    """``random_resized_crop_box(width, height, SampleRng(seed), scale, ratio)`` and then the flip
    (``rng.random() < hflip``) of the same generator: the same box, the same float operations in
    the same order, with splitmix64 inlined (draw ``k`` is ``_mix64(seed + k * golden)``): the
    per-sample crop costs a third of the method calls. ``tests/data/test_laion.py`` checks it
    against the two functions it stands for."""
    state = seed & _MASK64
    unit = 1.0 / (1 << 53)
    area = width * height
    lo, hi = scale
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    box = None
    for _ in range(10):
        state = (state + _GOLDEN64) & _MASK64
        target = area * (lo + (hi - lo) * ((_mix64(state) >> 11) * unit))
        state = (state + _GOLDEN64) & _MASK64
        aspect = math.exp(log_lo + (log_hi - log_lo) * ((_mix64(state) >> 11) * unit))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            state = (state + _GOLDEN64) & _MASK64
            left = _mix64(state) % (width - w + 1)
            state = (state + _GOLDEN64) & _MASK64
            top = _mix64(state) % (height - h + 1)
            box = (left, top, left + w, top + h)
            break
    if box is None:
        box = ratio_clamped_box(width, height, ratio)  # random_resized_crop_box's fallback after 10 misses
    if hflip <= 0:
        return (*box, False)  # random() >= 0: no draw can flip
    state = (state + _GOLDEN64) & _MASK64
    return (*box, (_mix64(state) >> 11) * unit < hflip)


class BatchBuffers:
    """A worker's batch image arrays, reused once no one holds the batch any more.

    A fresh (B, canvas, canvas, 3) array per batch (12.6 MB for 64 x 256 px) is, depending on the
    allocator's state, new pages from the kernel: a page fault and zeroing for every 4 KiB the
    decoder writes (2-7 faults per sample measured in ``benchmarks/loader_speed.py``). Each batch
    is handed out as a new view of a kept array; the array is handed out again once that view is
    gone: the batch's tensor (``torch.from_numpy`` holds the view) and everything made from it
    dropped by the consumer, or, in a DataLoader worker, the batch copied to shared memory.

    Args:
        shape: (B, canvas, canvas, 3).
        keep: arrays kept (a consumer holding one batch while the next is made needs 2); when all
            are held, a new array is made and not kept.
    """

    def __init__(self, shape: tuple[int, ...], keep: int = 2):
        self.shape, self.keep = shape, keep
        self._kept: list[tuple[np.ndarray, weakref.ref]] = []  # (array, the view last handed out)

    def take(self) -> np.ndarray:
        """An uninitialised uint8 array of ``shape`` that no one else holds."""
        for i, (array, handed) in enumerate(self._kept):
            if handed() is None:
                view = array.view()
                self._kept[i] = (array, weakref.ref(view))
                return view
        array = np.empty(self.shape, np.uint8)
        view = array.view()
        if len(self._kept) < self.keep:
            self._kept.append((array, weakref.ref(view)))
        return view


@dataclass
class Position:
    """A worker's place in its stream: epoch, batches yielded in it, samples taken from its shuffle buffer."""
    epoch: int = 0
    batch: int = 0
    taken: int = 0


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class _Redirect:
    """A counter that counts into whichever counter ``target`` is now (the raw reader's read errors
    go to the scratch counter while a resumed block is read again)."""

    def __init__(self, target: dict):
        self.target = target

    def get(self, key, default=None):
        return self.target.get(key, default)

    def __setitem__(self, key, value) -> None:
        self.target[key] = value


@dataclass
class LaionStream(IterableDataset):
    """Endless micro-batches of one data rank (see the module docstring).

    Yields (images uint8 (B, canvas, canvas, 3), tokens int64 (B, context), boxes float32
    (B, 5) = x0, y0, x1, y1, flip, info dict with the worker, its position, counters and keys).
    """
    sources: list[Source]
    tokenizer: Any  # captions -> (N, context) int64
    micro_batch: int
    data_rank: int
    data_world: int
    canvas: int
    seed: int = 0
    resampled: bool = True
    epoch_samples: int | None = None  # resampled: samples per epoch over all data ranks
    filters: dict = field(default_factory=dict)
    shuffle_buffer: int = 1000
    train: bool = True  # random resized crop (+ flip); else the central square
    crop_scale: tuple = (0.9, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.0
    workers: int = 1  # DataLoader workers (readers per data rank)
    state: dict | None = None  # LaionLoader.state_dict() of this data rank, to resume from

    def __post_init__(self):
        if not 0 <= self.data_rank < self.data_world:
            raise ValueError(f"data rank {self.data_rank} outside [0, {self.data_world})")
        self.workers = max(1, self.workers)
        self.weights = [s.weight for s in self.sources]
        if not self.resampled:
            if any(s.sizes is None for s in self.sources):
                unknown = next(s.pattern for s in self.sources if s.sizes is None)
                raise ValueError(f"data.shards {unknown!r}: exact epochs (data.resampled=false) need every shard's "
                                 "size: keep img2dataset's {shard}_stats.json beside the tars, or write a "
                                 "sizes.json ({\"00000.tar\": count, ...}) and name it as {pattern, sizes}")
            if len(set(self.weights)) > 1:
                raise ValueError("data.shards weights mix sources by resampling; set data.resampled=true, or drop "
                                 "the weights for exact epochs (every sample once per epoch)")
        total = sum(s.num_samples or 0 for s in self.sources)
        samples = self.epoch_samples if self.resampled and self.epoch_samples else total
        if not samples:
            raise ValueError("data.epoch_samples is needed with resampling when the shard sizes are unknown "
                             "(no _stats.json / sizes.json)")
        self.rank_batches = (math.ceil if self.resampled else math.floor)(samples / (self.data_world * self.micro_batch))
        if self.rank_batches < 1:
            raise ValueError(f"an epoch of {samples} samples gives no micro-batch of {self.micro_batch} to each of "
                             f"{self.data_world} data ranks; use more data or a smaller train.micro_batch")
        self._check_state()
        self._buffers: BatchBuffers | None = None

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: their own batch arrays
        return {**self.__dict__, "_buffers": None}

    def _check_state(self) -> None:
        s = self.state
        if s is None:
            return
        if s.get("workers") != self.workers or s.get("data_world") != self.data_world:
            raise ValueError(f"the loader position in the checkpoint is for {s.get('data_world')} data rank(s) x "
                             f"{s.get('workers')} worker(s), this run has {self.data_world} x {self.workers}; resume "
                             "with the same data-parallel size and data.num_workers to continue exactly")

    def quota(self, worker: int) -> int:
        """Batches worker ``worker`` yields per epoch (DataLoader takes batches round-robin)."""
        return self.rank_batches // self.workers + (worker < self.rank_batches % self.workers)

    # raw samples ---------------------------------------------------------------------------------
    #
    # A worker's raw stream in one pass is a sequence of shards (exact epochs: its range of the
    # epoch's order; resampled: its endless draws), read from a cursor (place in that sequence,
    # sample index in that shard): a resumed run seeks there (``tars.read_tar_samples``' start,
    # ``tar_index``) instead of reading the pass from its beginning.

    def _exact_range(self, epoch: int, worker: int) -> tuple[list[tuple[str, int]], int, int]:
        """(shard url, size) of this epoch's order, and this worker's [start, end) in its samples."""
        pairs = [(u, n) for s in self.sources for u, n in zip(s.urls, s.sizes)]
        perm = np.random.default_rng(_seed(self.seed, epoch, 0x5A4D)).permutation(len(pairs))
        order = [pairs[i] for i in perm]
        before = self.data_rank * self.rank_batches + sum(self.quota(w) for w in range(worker))
        start = before * self.micro_batch
        return order, start, start + self.quota(worker) * self.micro_batch

    def _exact_shards(self, epoch: int, worker: int) -> list[tuple[str, int, int]]:
        """(url, first sample, end sample) of each shard in this worker's range of ``epoch``."""
        order, start, end = self._exact_range(epoch, worker)
        offset, chosen = 0, []
        for url, size in order:
            if offset + size > start and offset < end:
                chosen.append((url, max(0, start - offset), min(size, end - offset)))
            offset += size
        return chosen

    def resampled_urls(self, epoch: int, worker: int) -> Iterator[str]:
        """Endless shard draws of a worker: a source with probability proportional to its
        weight, then one of its shards uniformly (open_clip's resampling, per source)."""
        rng = random.Random(_seed(self.seed, epoch, self.data_rank, worker, 0x2E5A))
        while True:
            source = rng.choices(self.sources, weights=self.weights)[0]
            yield rng.choice(source.urls)

    def _raw(self, epoch: int, worker: int, counts: dict, at: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, dict]]:
        """(place of its shard in the pass, sample) of a pass's raw samples from cursor ``at``."""
        if self.resampled:
            shards: Iterator = ((url, 0, None) for url in self.resampled_urls(epoch, worker))
        else:
            shards = iter(self._exact_shards(epoch, worker))
        for place, (url, first, end) in enumerate(shards):
            if place < at[0]:
                continue  # a draw or a range entry costs microseconds; no shard is opened
            begin = max(first, at[1]) if place == at[0] else first
            for sample in read_shards([url], counts, start=begin):
                if end is not None and sample["__index__"] >= end:
                    break
                yield place, sample

    def _keep(self, sample: dict, sample_filter: SampleFilter, counts: dict) -> tuple[dict, str, dict | None] | None:
        """(sample, caption, json) if the sample is complete and passes the filters; else counted, None."""
        counts["read"] += 1
        caption = sample.get("txt")
        caption = caption.decode("utf-8", "replace").strip() if caption is not None else None
        meta = None
        if "json" in sample and sample_filter.needs_json:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = None
        if "jpg" not in sample and not any(e in sample for e in IMAGE_EXTS):
            counts["missing_image"] += 1
            return None
        if not caption:
            counts["missing_caption"] += 1
            return None
        why = sample_filter.reason(caption, meta, sample["__key__"]) if sample_filter.active else None
        if why is not None:
            counts[why] += 1
            return None
        return sample, caption, meta

    def _pass(self, epoch: int, worker: int, repeat: int, counts: dict,
              resume: dict | None = None) -> Iterator[tuple[tuple[dict, str, dict | None], dict]]:
        """(sample, caption, json) of one pass in training order, each with its place: raw samples
        -> filters -> shuffle blocks.

        Shuffling is by blocks: the samples kept of each next ``shuffle_buffer`` raw samples,
        permuted with a generator seeded by (epoch, rank, worker, pass, block). Why not webdataset's
        ``shuffle``: its buffer lives inside a generator, so a resumed run could rebuild it only by
        reading the pass from its start; a block is rebuilt from its first raw sample's cursor, so
        resuming reads at most one block. Each item's place (block, its first raw sample's cursor,
        the item's offset in the block, the de-duplication window as the block began) is what
        ``resume`` takes back; the resumed block is read into a scratch counter (the checkpoint's
        counters already hold it)."""
        sample_filter = SampleFilter(self.filters, self.shuffle_buffer)
        size = self.shuffle_buffer if self.shuffle_buffer > 1 else UNSHUFFLED_BLOCK
        block, skip, at = 0, 0, (0, 0)
        scratch = None
        if resume is not None:
            block, skip, at = resume["block"], resume["offset"], (resume["shard"], resume["sample"])
            sample_filter.load_state(resume.get("recent"))
            scratch = collections.Counter()  # the resumed block: its reads were counted before the checkpoint
        sink = _Redirect(scratch if scratch is not None else counts)
        raw = self._raw(epoch, worker, sink, at)
        while True:
            recent = sample_filter.state()  # the window as this block begins
            tally = sink.target
            items, cursor = [], None
            for place, sample in itertools.islice(raw, size):
                cursor = cursor or (place, sample["__index__"])
                kept = self._keep(sample, sample_filter, tally)
                if kept is not None:
                    items.append(kept)
            sink.target = counts
            scratch = None
            if cursor is None:
                return
            if self.shuffle_buffer > 1:
                random.Random(_seed(self.seed, epoch, self.data_rank, worker, repeat, block, 0x5B0F)).shuffle(items)
            for offset in range(skip, len(items)):
                place = {"repeat": repeat, "block": block, "shard": cursor[0], "sample": cursor[1],
                         "offset": offset + 1}
                if recent is not None:
                    place["recent"] = recent
                yield items[offset], place
            block, skip = block + 1, 0

    def _candidates(self, epoch: int, worker: int, counts: dict,
                    resume: dict | None = None) -> Iterator[tuple[tuple[dict, str, dict | None], dict]]:
        """``_pass`` items in training order. Exact epochs: the worker's range, then again
        (counted as repeats) for as long as the quota is not filled."""
        if self.resampled:
            yield from self._pass(epoch, worker, 0, counts, resume)
            return
        for repeat in itertools.count(resume["repeat"] if resume else 0):
            got = resume["offset"] if resume else 0  # items the resumed pass gave before the checkpoint
            for item in self._pass(epoch, worker, repeat, counts, resume):
                got += 1
                counts["repeated"] += repeat > 0
                yield item
            resume = None
            if got == 0:
                _, start, end = self._exact_range(epoch, worker)
                raise ValueError(f"data rank {self.data_rank} worker {worker}: no usable sample among samples "
                                 f"[{start}, {end}) of epoch {epoch}; check the shards and data.filters")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"LaionStream built for {self.workers} workers runs in {info.num_workers}")
        state = self.state or {}
        # The DataLoader starts its round-robin at worker 0; after a resume the next batch is due
        # from logical worker (batches % workers): rotate so that physical 0 plays it.
        worker = (physical + state.get("batches", 0)) % self.workers
        saved = dict(state.get("positions", {}).get(str(worker), {}))
        resume = saved.pop("place", None)
        pos = Position(**saved)
        if pos.taken and resume is None:
            logger.warning("data worker %d: the checkpoint's loader position has no seek place (written before "
                           "seekable resume); epoch %d restarts its reading, batch %d on: not the samples an "
                           "uninterrupted run would have seen", worker, pos.epoch, pos.batch)
        counts = collections.Counter({k: 0 for k in COUNTERS})
        counts.update(state.get("counts", {}).get(str(worker), {}))
        for epoch in itertools.count(pos.epoch):
            first = pos if epoch == pos.epoch else Position(epoch)
            yield from self._epoch(epoch, worker, first, counts, resume if epoch == pos.epoch else None)

    def _epoch(self, epoch: int, worker: int, pos: Position, counts: collections.Counter,
               resume: dict | None = None):
        """Batches ``pos.batch`` .. quota of ``epoch``; a resumed epoch seeks to its place ``resume``
        (``_pass``) and continues with the sample it would have decoded next."""
        quota = self.quota(worker)
        if pos.batch >= quota:
            return
        base = _seed(self.seed, epoch, self.data_rank, worker, 0xA06)
        taken, batch = pos.taken, pos.batch
        c, b = self.canvas, self.micro_batch
        train, crop_scale, crop_ratio, hflip = self.train, self.crop_scale, self.crop_ratio, self.hflip
        if self._buffers is None:  # kept across epochs; made in the process that reads (a DataLoader worker)
            self._buffers = BatchBuffers((b, c, c, 3))
        buffers = self._buffers
        # boxes: (x0, y0, x1, y1, flip) of each sample, made an array once per batch
        images, boxes, captions, keys = buffers.take(), [], [], []
        for (sample, caption, _), place in self._candidates(epoch, worker, counts, resume):
            taken += 1
            n = len(keys)
            try:
                h, w, resized = decode_to_canvas(sample, images[n])
            except Exception:  # noqa: BLE001 -- any undecodable image is a bad sample, never a crash
                counts["decode_error"] += 1
                continue
            counts["resized"] += resized
            counts["kept"] += 1
            if train:  # a generator per sample: crops do not depend on where a run resumed
                boxes.append(train_box(base * 1_000_003 + taken, w, h, crop_scale, crop_ratio, hflip))
            else:
                boxes.append((*center_box(w, h), False))
            captions.append(caption)
            keys.append(sample["__key__"])
            if len(keys) == b:
                batch += 1
                meta = {"worker": worker, "position": {"epoch": epoch, "batch": batch, "taken": taken, "place": place},
                        "counts": dict(counts), "keys": keys}
                yield (torch.from_numpy(images), self.tokenizer(captions),
                       torch.from_numpy(np.array(boxes, np.float32)), meta)
                if batch == quota:
                    break
                images = None  # ours dropped: the buffer is free again once the consumer drops the batch
                images, boxes, captions, keys = buffers.take(), [], [], []


class LaionLoader:
    """A DataLoader over ``LaionStream`` that remembers where each worker is.

    Iterating yields (images uint8 channels-last (B, canvas, canvas, 3), tokens (B, context), boxes (B, 5)).
    ``state_dict()`` -> the position to store in a checkpoint; ``stats()`` -> counters of
    this data rank (read, kept, filtered, duplicate, bad by reason, repeated, resized).
    """

    def __init__(self, stream: LaionStream, num_workers: int, prefetch: int = 4, pin_memory: bool = False):
        self.stream = stream
        state = stream.state or {}
        self.batches = int(state.get("batches", 0))
        self.positions = dict(state.get("positions", {}))
        self.counts = dict(state.get("counts", {}))
        self.last_keys: list[str] = []
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=prefetch if num_workers > 0 else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self._track(iter(self.loader))  # the workers start now, under the caller's signal mask

    def _track(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, tokens, boxes, meta in batches:
            worker = str(int(meta["worker"]))
            self.positions[worker] = dict(meta["position"])  # ints, and the seek place (ints, the dedupe window)
            self.counts[worker] = {k: int(v) for k, v in meta["counts"].items()}
            self.batches += 1
            self.last_keys = list(meta["keys"])
            yield images, tokens, boxes

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": self.stream.workers, "data_world": self.stream.data_world,
                "data_rank": self.stream.data_rank, "positions": self.positions, "counts": self.counts}

    def stats(self) -> dict[str, int]:
        total = collections.Counter({k: 0 for k in COUNTERS})
        for counts in self.counts.values():
            total.update(counts)
        return dict(total)


def describe_stats(stats: dict[str, int]) -> str:
    """'3 bad samples skipped (0.40% of 750 read): 1 decode_error, 2 read_error; 10 filtered, ...'."""
    bad = sum(stats.get(k, 0) for k in BAD)
    read = max(stats.get("read", 0), 1)
    parts = ", ".join(f"{stats[k]} {k}" for k in BAD if stats.get(k))
    text = f"{bad} bad samples skipped ({100 * bad / read:.2f}% of {stats.get('read', 0)} read)"
    text += f": {parts}" if parts else ""
    extra = ", ".join(f"{stats[k]} {k}" for k in ("filtered", "duplicate", "repeated", "resized") if stats.get(k))
    return text + (f"; {extra}" if extra else "")


def build_laion_loader(data_cfg: Any, tokenizer, seed: int, micro_batch: int, data_rank: int, data_world: int,
                       image_size: int, train: bool = True, state: dict | None = None,
                       pin_memory: bool = False) -> LaionLoader:
    """The image-text loader ``data_cfg`` (``vitscale.config.DataConfig``) asks for.

    Args:
        tokenizer: captions -> (N, context) int64 (``vitscale.data.captions.CaptionTokenizer``:
            open_clip's BPE for 49408-token towers).
        seed: shard order, resampling, shuffling, crops.
        micro_batch, data_rank, data_world: batch size and this rank's place among the data ranks.
        image_size: the model's input size; the canvas defaults to ``round(image_size * 8 / 7)``
            (256 for 224, open_clip's resize), or ``data.canvas``.
        train: random resized crops; False: central squares, no shuffling.
        state: ``LaionLoader.state_dict()`` from a checkpoint.
    """
    d = data_cfg
    canvas = d.canvas or round(image_size * 8 / 7)
    need_sizes = not d.resampled or d.epoch_samples is None
    stream = LaionStream(resolve_sources(d.shards, sizes=need_sizes), tokenizer, micro_batch, data_rank, data_world, canvas, seed,
                         d.resampled, d.epoch_samples, check_filters(d.filters),
                         d.shuffle_buffer if train else 0, train, tuple(d.crop_scale), tuple(d.crop_ratio),
                         d.hflip, max(1, d.num_workers), state)
    return LaionLoader(stream, d.num_workers, d.prefetch, pin_memory)
