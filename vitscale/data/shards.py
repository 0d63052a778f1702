"""Writing and indexing WebDataset tar shards of a synthetic dataset.

Layout of a dataset folder (``vitscale-synth`` writes it, ``synthetic_loader`` reads it)::

    shard-000000.tar ... shard-{N-1}.tar   samples {key}.cls / {key}.json / {key}.png (or .jpg, .npy)
    dataset.json                           what the shards hold; written last, once all shards exist
    dataset.pending.json                   the same, while shards are still being written
    categories.json                        searched category parameters (generators with categories())

Global sample index ``i`` is image ``i // classes`` of class ``i % classes``, and shard ``s``
holds indices ``[s * K, (s + 1) * K)``: every shard mixes all classes, so a reader that
sees only a few shards still sees every class. Keys are ``{label:06d}_{instance:07d}``
(no dots: WebDataset splits key and extension at the first dot of the file name).

Every shard is a pure function of the dataset's arguments and its index: tar headers
are fixed (mtime 0, uid 0, no user names) and PNGs are written by our own encoder at
zlib level 1 with filter type None, so the same arguments give byte-identical shards
in any process, worker or rank (with the same zlib). That is what lets any number of
ranks write disjoint shards, and a rerun skip shards that already exist: a shard is
written under a temporary name and renamed only when complete, so a shard file that
exists is whole.

The PNG encoder is ours rather than PIL's because PIL always runs PNG's adaptive
per-row filter search: at 224 px PIL (compress_level=1) took 2.9 ms per fractal image
against 1.1 ms here (zlib level 1, filter None), 2-3x slower for every generator, for
files of about the same size (Sub/Up filters or zlib's RLE strategy made files up to 2.5x
larger on smooth images for little gain in time).
"""
from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import socket
import struct
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from PIL import Image

import vitscale
from vitscale.data.tars import add_member, expand, is_remote
from vitscale.files import fsync_dir, write_text_atomic

logger = logging.getLogger(__name__)

ImageFormat = Literal["png", "jpg", "npy"]
IMAGE_EXTS = ("png", "jpg", "jpeg", "npy")  # what a shard sample's image may be stored as
SHARD_GLOB = "shard-*.tar"
DATASET_FILE = "dataset.json"
PENDING_FILE = "dataset.pending.json"  # the same description while shards are still being written
CATEGORIES_FILE = "categories.json"
CATEGORIES_FORMAT = "vitscale-categories"
PNG_COMPRESS_LEVEL = 1  # zlib level: see the module docstring for the measurement
JPEG_QUALITY = 95
_PARTIAL = ".partial"  # suffix of a shard being written
_SHARD_RE = re.compile(r"^shard-(\d+)\.tar$")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a synthetic shard dataset's bytes.

    Args:
        generator: registered generator name.
        classes, instances: ``classes * instances`` samples in all.
        seed: the generator's seed.
        image_size: side length of the rendered images, pixels.
        format: image encoding, ``png`` (lossless) or ``jpg`` (quality 95).
        shard_size: samples per shard (the last shard may hold fewer).
        generator_kwargs: the generator's constructor arguments besides the four common ones,
            defaults filled in, JSON-normalised.
        categories_sha256: hash of the category list for searched generators, else None.
    """

    generator: str
    classes: int
    instances: int
    seed: int
    image_size: int
    format: ImageFormat = "png"
    shard_size: int = 1000
    generator_kwargs: dict = field(default_factory=dict)
    categories_sha256: str | None = None

    def __post_init__(self):
        for name in ("classes", "instances", "image_size", "shard_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.format not in ("png", "jpg", "npy"):
            raise ValueError(f"format={self.format!r} must be 'png', 'jpg' or 'npy'")

    @property
    def num_samples(self) -> int:
        return self.classes * self.instances

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    def shard_indices(self, shard: int) -> range:
        """Global sample indices held by ``shard``."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:0{self._shard_digits}d}.tar"

    @property
    def _shard_digits(self) -> int:
        return max(6, len(str(self.num_shards - 1)))

    def shard_pattern(self) -> str:
        """Brace pattern of all shard names, e.g. ``shard-{000000..000099}.tar``."""
        return f"shard-{{{0:0{self._shard_digits}d}..{self.num_shards - 1:0{self._shard_digits}d}}}.tar"

    def key(self, label: int, instance: int) -> str:
        return f"{label:0{max(6, len(str(self.classes - 1)))}d}_{instance:0{max(7, len(str(self.instances - 1)))}d}"

    def arguments(self) -> dict:
        """The fields that decide the bytes: two runs into one folder must agree on all of them."""
        return asdict(self)

    def description(self) -> dict:
        """``dataset.json``: the arguments plus what a reader needs without recomputing them."""
        return {**self.arguments(), "num_samples": self.num_samples, "num_shards": self.num_shards,
                "shards": self.shard_pattern(), "key": "{label}_{instance} zero-padded",
                "sample_order": "index i = instance * classes + label; "
                                "shard s holds [s * shard_size, (s + 1) * shard_size)",
                "categories": CATEGORIES_FILE if self.categories_sha256 else None,
                "png_compress_level": PNG_COMPRESS_LEVEL if self.format == "png" else None,
                "jpeg_quality": JPEG_QUALITY if self.format == "jpg" else None,
                "vitscale_version": vitscale.__version__}


def to_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys); numpy scalars and arrays become plain numbers and lists."""
    def plain(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable: {o!r}")

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=plain)


# -- encoding ---------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(img: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes: 8-bit RGB, filter type None on every row, zlib ``level``."""
    h, w, _ = img.shape
    rows = np.empty((h, 3 * w + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None: the cheapest, and as small as Sub/Up at level 1 on our images
    rows[:, 1:] = img.reshape(h, 3 * w)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _png_chunk(b"IEND", b""))


def encode_image(img: np.ndarray, fmt: ImageFormat) -> bytes:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"a generator returned an image of shape {img.shape} and dtype {img.dtype}; "
                         "the contract is (H, W, 3) uint8")
    if fmt == "png":
        return encode_png(img)
    buf = io.BytesIO()
    if fmt == "npy":  # the array as it is: no encode or decode (shards only vitscale reads)
        np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _npy_array(data: bytes) -> np.ndarray:
    """A ``.npy`` member -> its (H, W, 3) uint8 array; never unpickles (``allow_pickle=False``)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"a .npy image holds {arr.dtype} {arr.shape}; shards hold (H, W, 3) uint8")
    return arr


def decode_image(data: bytes, ext: str) -> Image.Image:
    """A shard sample's image bytes (``IMAGE_EXTS``) -> an RGB PIL image (``.npy``: no decode, a view)."""
    if ext == "npy":
        return Image.fromarray(_npy_array(data))
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")


def image_size(data: bytes, ext: str) -> tuple[int, int]:
    """(width, height) of a shard sample's image from its header only."""
    if ext == "npy":
        buf = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(buf)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape = read(buf)[0]
        return shape[1], shape[0]
    with Image.open(io.BytesIO(data)) as img:
        return img.size


# -- writing ----------------------------------------------------------------------------------------

def write_shard(generator, spec: DatasetSpec, out_dir: Path, shard: int,
                progress: Callable[[int], None] | None = None) -> Path:
    """Render shard ``shard`` of ``spec`` into ``out_dir``; it appears under its name only when complete.

    Args:
        generator: the generator instance ``spec`` describes.
        spec: the dataset.
        out_dir: the dataset folder.
        shard: shard index in ``[0, spec.num_shards)``.
        progress: called with 1 after each image (progress bars).

    Returns:
        The shard's path.
    """
    final = out_dir / spec.shard_name(shard)
    tmp = final.with_name(final.name + _PARTIAL)
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in spec.shard_indices(shard):
                label, instance = index % spec.classes, index // spec.classes
                key = spec.key(label, instance)
                image = encode_image(generator.render(label, instance), spec.format)
                params = {**generator.params(label, instance), "label": label, "instance": instance}
                add_member(tar, f"{key}.cls", str(label).encode())
                add_member(tar, f"{key}.json", to_json(params).encode())
                add_member(tar, f"{key}.{spec.format}", image)
                if progress is not None:
                    progress(1)
        f.flush()
        os.fsync(f.fileno())  # the rename below must never publish a shard whose bytes are not on disk
    os.replace(tmp, final)
    fsync_dir(out_dir)
    return final


def complete_shards(spec: DatasetSpec, out_dir: Path) -> set[int]:
    """Indices of the shards that exist under their final name (so are complete)."""
    return {s for s in range(spec.num_shards) if (out_dir / spec.shard_name(s)).exists()}


def check_arguments(arguments: dict, out_dir: Path) -> bool:
    """Compare ``arguments`` (some or all ``DatasetSpec`` fields) with the dataset in ``out_dir``.

    Returns:
        Whether ``out_dir`` holds a (possibly unfinished) dataset description; False for a new folder.

    Raises:
        ValueError: the description there differs in one of ``arguments``.
    """
    mine = json.loads(to_json(arguments))
    for name in (DATASET_FILE, PENDING_FILE):
        path = out_dir / name
        try:
            theirs = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); it is not a folder vitscale-synth wrote, "
                             "use a new --out folder") from None
        theirs = {k: theirs.get(k) for k in mine} | {"vitscale_version": theirs.get("vitscale_version")}
        diff = [f"{k}: {theirs[k]!r} there, {mine[k]!r} now" for k in mine if theirs[k] != mine[k]]
        if diff:
            raise ValueError(f"{out_dir} already holds a dataset written with other arguments ({'; '.join(diff)}); "
                             f"use a new --out folder (or delete {out_dir})")
        if theirs["vitscale_version"] != vitscale.__version__:
            logger.warning("%s was started by vitscale %s, this is %s: images of the two versions may differ",
                           path, theirs["vitscale_version"], vitscale.__version__)
        return True
    return False


def prepare_out_dir(spec: DatasetSpec, out_dir: Path) -> None:
    """Create ``out_dir`` or check that it holds (part of) this same dataset.

    Every rank calls it; ``dataset.pending.json`` records the arguments before any shard
    exists, so an interrupted run is recognised too.

    Raises:
        ValueError: the folder holds a dataset made with other arguments, or shards of unknown origin.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if check_arguments(spec.arguments(), out_dir):
        return
    # A rank that starts later than the others finds their pending file above; the check
    # below reads it once more in case it appeared between the two looks.
    if any(_SHARD_RE.match(p.name) for p in out_dir.iterdir()) and not (out_dir / PENDING_FILE).exists():
        raise ValueError(f"{out_dir} holds shard files but no {DATASET_FILE} or {PENDING_FILE}, so their "
                         "arguments are unknown; use a new --out folder")
    if (out_dir / PENDING_FILE).exists():
        return prepare_out_dir(spec, out_dir)
    write_text_atomic(out_dir / PENDING_FILE, json.dumps(spec.description(), indent=2, sort_keys=True) + "\n")


def claim_shards(spec: DatasetSpec, out_dir: Path, rank: int = 0, world: int = 1) -> list[int]:
    """The shards rank ``rank`` of ``world`` still has to write (``s % world == rank``).

    Deletes the rank's stale partial files: each shard has exactly one writer in a run,
    so a partial file of one of this rank's shards is left over from a run that died.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    todo = []
    for s in range(rank, spec.num_shards, world):
        final = out_dir / spec.shard_name(s)
        stale = final.with_name(final.name + _PARTIAL)
        if stale.exists():
            logger.info("removing %s, left by an interrupted run", stale)
            stale.unlink()
        if not final.exists():
            todo.append(s)
    return todo


def finish_dataset(spec: DatasetSpec, out_dir: Path) -> bool:
    """Publish ``dataset.json`` if every shard exists; returns whether the dataset is complete.

    Every rank calls it after writing its shards. The rank whose last rename came last
    sees all shards and publishes; the content is the same whoever does it, and
    publication is one atomic rename, so ranks finishing together do no harm.
    """
    if len(complete_shards(spec, out_dir)) < spec.num_shards:
        return False
    write_text_atomic(out_dir / DATASET_FILE, json.dumps(spec.description(), indent=2, sort_keys=True) + "\n")
    (out_dir / PENDING_FILE).unlink(missing_ok=True)
    return True


def categories_sha256(categories: list) -> str:
    return hashlib.sha256(to_json(categories).encode()).hexdigest()


def _categories_payload(categories: list, meta: dict) -> str:
    return to_json({"format": CATEGORIES_FORMAT, "meta": meta, "categories": categories}) + "\n"


def save_categories(path: Path, categories: list, **meta) -> None:
    """Save a category list with what it was searched for (``meta``: generator, classes, seed, ...)."""
    write_text_atomic(Path(path), _categories_payload(categories, meta))


def load_categories(path: Path, generator: str, classes: int) -> list:
    """The category list in ``path``: a ``{"meta": {...}, "categories": [...]}`` file (``save_categories``,
    or a generator's own file of that shape) or a bare JSON list.

    Raises:
        ValueError: unreadable, for another generator, or not ``classes`` entries.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read categories file {path}: {e}") from None
    categories = data if isinstance(data, list) else data.get("categories") if isinstance(data, dict) else None
    if not isinstance(categories, list):
        raise ValueError(f"categories file {path} holds no category list (expected {{'categories': [...]}})")
    meta = data.get("meta") or {} if isinstance(data, dict) else {}
    if meta.get("generator", generator) != generator:
        raise ValueError(f"categories file {path} was searched for generator '{meta['generator']}', not "
                         f"'{generator}'")
    if len(categories) != classes:
        raise ValueError(f"categories file {path} holds {len(categories)} categories but --classes is {classes}; "
                         f"search again with --classes {classes}")
    return categories


def publish_categories(out_dir: Path, categories: list, **meta) -> list:
    """Write ``out_dir/categories.json`` unless it exists; return the list the file holds.

    Several ranks may search at once: the first file to land wins (a hard link is an
    atomic create-if-absent), and every rank then uses the file's list, so all shards
    agree even if searches were to differ.
    """
    final = out_dir / CATEGORIES_FILE
    if not final.exists():
        tmp = final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        tmp.write_text(_categories_payload(categories, meta))
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return json.loads(final.read_text())["categories"]


# -- local worker processes -------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(build: Callable[[], object], spec: DatasetSpec, out_dir: Path, counter) -> None:
    _worker.update(generator=build(), spec=spec, out_dir=out_dir, counter=counter, pending=0)


def _count_in_worker(n: int) -> None:
    # Batched: one lock round trip per 16 images keeps the progress counter off the profile.
    _worker["pending"] += n
    if _worker["pending"] >= 16:
        with _worker["counter"].get_lock():
            _worker["counter"].value += _worker["pending"]
        _worker["pending"] = 0


def _write_in_worker(shard: int) -> int:
    write_shard(_worker["generator"], _worker["spec"], _worker["out_dir"], shard, _count_in_worker)
    with _worker["counter"].get_lock():
        _worker["counter"].value += _worker["pending"]
    _worker["pending"] = 0
    return shard


def write_shards(build: Callable[[], object], spec: DatasetSpec, out_dir: Path, shards: Iterable[int],
                 workers: int = 1, progress: Callable[[int], None] | None = None) -> None:
    """Write ``shards`` with ``workers`` local processes, each rendering whole shards.

    Args:
        build: returns the generator; a picklable callable (``functools.partial``), because
            each worker process builds its own.
        spec, out_dir: the dataset.
        shards: shard indices to write.
        workers: processes; 1 renders in this process.
        progress: called with the number of images done since its last call.

    Raises:
        RuntimeError: a worker process died (killed, out of memory); finished shards stay.
    """
    shards = list(shards)
    if workers <= 1 or len(shards) <= 1:
        generator = build()
        for s in shards:
            write_shard(generator, spec, out_dir, s, progress)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    seen = 0
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx,
                                                initializer=_init_worker,
                                                initargs=(build, spec, out_dir, counter)) as pool:
        pending = {pool.submit(_write_in_worker, s) for s in shards}
        try:
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5,
                                                        return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    fut.result()  # re-raises a worker's exception here
                if progress is not None and counter.value > seen:
                    progress(counter.value - seen)
                    seen = counter.value
        except concurrent.futures.process.BrokenProcessPool as e:
            raise RuntimeError("a shard-writing worker process died (killed or out of memory); finished "
                               "shards are kept: rerun the same command to resume") from e
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def is_shard_source(source: str) -> bool:
    """Whether ``data.source`` names shards (a folder, a path or pattern, a ``pipe:`` URL) rather
    than a generator."""
    return os.path.isdir(source) or "/" in source or source.endswith(".tar") or is_remote(source)


def resolve_shards(shards: str | list) -> tuple[list[str], list[dict]]:
    """Shard URLs and the ``dataset.json`` descriptions found beside them.

    Every rank calls this at start-up, so it touches few files: a folder's shards are
    taken from its ``dataset.json`` (which exists only once all shards do), a glob reads
    one directory, and of a brace pattern only the first and the last shard are checked
    (a wrong folder or range shows there; a hole in between fails when it is read).

    Args:
        shards: a dataset folder (all shards its ``dataset.json`` lists), a brace pattern
            (``/data/fractal/shard-{000000..000099}.tar``), a glob, a ``pipe:`` / remote URL
            pattern, or a list of these.

    Returns:
        (urls, descriptions): URLs sorted within each entry, and one description per
        folder that has a ``dataset.json``.

    Raises:
        ValueError: nothing matches, a checked shard is missing, or a folder is unfinished.
    """
    entries = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls: list[str] = []
    folders: set[str] = set()
    for entry in entries:
        if isinstance(entry, dict):
            raise ValueError(f"data.shards entry {entry!r}: weighted shard lists are for image-text mixing; "
                             "list plain patterns or folders for synthetic shards")
        entry = str(entry)
        remote = is_remote(entry)
        if not remote and Path(entry).is_dir():
            folder = Path(entry)
            if not (folder / DATASET_FILE).exists():
                hint = (f" ({PENDING_FILE} is there: its writing has not finished; rerun vitscale-synth)"
                        if (folder / PENDING_FILE).exists() else "")
                raise ValueError(f"data.shards={entry}: the folder has no {DATASET_FILE}{hint}; pass a shard "
                                 "pattern instead if the shards are complete")
            pattern = json.loads((folder / DATASET_FILE).read_text())["shards"]
            matched = [str(folder / name) for name in expand(pattern)]
        elif not remote and any(c in entry for c in "*?["):
            matched = sorted(glob.glob(entry))
        else:
            matched = sorted(expand(entry))
            missing = [u for u in {matched[0], matched[-1]} if not remote and not Path(u).exists()]
            if missing:
                raise ValueError(f"data.shards entry {entry!r}: shard {sorted(missing)[0]} does not exist")
        if not matched:
            raise ValueError(f"data.shards entry {entry!r} matches no shard")
        if not remote:
            folders |= {os.path.dirname(u) for u in matched}
        urls += matched
    infos = {}
    for folder in folders:
        path = Path(folder or ".") / DATASET_FILE
        if path.exists():
            infos[str(path.resolve())] = json.loads(path.read_text())
    return urls, list(infos.values())
