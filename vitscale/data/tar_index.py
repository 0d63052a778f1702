"""Where each sample of a tar shard starts: the byte offset of its first member's header, so a
reader can seek to sample ``i`` instead of reading the ``i`` samples before it (exact resume of
image-text shards, ``laion.py``; a worker's range that starts inside a shard).

The index of a shard is built lazily, the first time a reader seeks in it, from the tar headers
alone (the members' bytes are seeked over), and cached as JSON (never a pickle: reading it runs
no code) written atomically (``files.replacing``):

- next to the shard, ``{shard}.idx.json``, when its folder is writable (the index is then shared
  by every run, rank and worker that reads the shard);
- else under ``$VITSCALE_CACHE`` (default ``~/.cache/vitscale``) ``/tar-index/``, named by a hash of
  the shard's absolute path.

A cached index records the shard's size and modification time and is rebuilt when either
changed. Samples are grouped as ``tars.read_tar_samples`` groups them (consecutive members with
the same key, webdataset's rule), so offset ``i`` is where the ``i``-th sample it yields starts.

Why our own: webdataset and Python's ``tarfile`` read tars as streams and keep no offsets
(``tarfile``'s ``offset`` attributes exist but it parses every header through Python's slow
path, and it does not group members into samples).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable

from vitscale.files import replacing

logger = logging.getLogger(__name__)

FORMAT = "vitscale-tar-index"
VERSION = 2

_memory: dict[str, tuple[tuple[int, int], dict]] = {}  # absolute path -> ((size, mtime_ns), index): this process's


def cache_path(shard: str | Path) -> Path:
    """Where the index of local shard ``shard`` is cached (see the module docstring)."""
    shard = Path(shard).resolve()
    if os.access(shard.parent, os.W_OK):
        return shard.with_name(shard.name + ".idx.json")
    root = Path(os.environ.get("VITSCALE_CACHE") or Path.home() / ".cache" / "vitscale") / "tar-index"
    return root / (hashlib.sha1(str(shard).encode()).hexdigest()[:20] + ".idx.json")


Scan = Callable[[BinaryIO, str], tuple[list[int], int, bool]]


def build_index(shard: str | Path, scan: Scan) -> dict:
    """Scan ``shard``'s headers with ``scan`` (``tars.sample_starts``): ``{"offsets": [start of each
    sample], "end": where the scan stopped, "clean": whether the whole shard reads without error}``. The scan stops at the end-of-archive marker or at the
    first member the reader refuses (a bad header, a truncated member, an absolute or '..' name):
    reading from ``end`` then ends or fails exactly as reading through the whole shard does."""
    with open(shard, "rb") as f:
        offsets, end, clean = scan(f, str(shard))
    return {"offsets": offsets, "end": end, "clean": clean}


def sample_offsets(shard: str | Path, scan: Scan) -> dict:
    """The index of local shard ``shard``: from this process's memory, its cache, or built (with
    ``scan``) and cached."""
    path = Path(shard).resolve()
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    held = _memory.get(str(path))
    if held is not None and held[0] == stamp:
        return held[1]
    cached = cache_path(path)
    index = None
    try:
        data = json.loads(cached.read_text())
        if (data.get("format"), data.get("version"), data.get("size"), data.get("mtime_ns")) == (FORMAT, VERSION, *stamp):
            index = {"offsets": [int(o) for o in data["offsets"]], "end": int(data["end"]), "clean": bool(data["clean"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, stale or unreadable: build it
    if index is None:
        index = build_index(path, scan)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with replacing(cached) as tmp:
                tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "size": stamp[0],
                                           "mtime_ns": stamp[1], **index}))
        except OSError as exc:  # a read-only cache: the index lives in this process only
            logger.warning("could not cache the sample index of %s at %s: %s", path, cached, exc)
    _memory[str(path)] = (stamp, index)
    return index


def seek_sample(f: BinaryIO, shard: str | Path, sample: int, scan: Scan) -> None:
    """Position the open file ``f`` of ``shard`` at the start of sample ``sample`` (past the last
    indexed sample: where the index scan stopped)."""
    index = sample_offsets(shard, scan)
    offsets = index["offsets"]
    f.seek(offsets[sample] if sample < len(offsets) else index["end"])
