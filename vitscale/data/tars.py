"""Tar shards, the WebDataset layout every data source here reads or writes: URL patterns,
member names, our own ustar reader, and members with fixed headers.

Used by the synthetic shard sets (``shards.py``), the image-text loader (``laion.py``), the
LAION-format sample writer (``laion_sample.py``) and evaluation. Samples are grouped as
webdataset groups them (consecutive members with the same key); nothing is unpickled.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import PurePosixPath
from typing import Callable, Iterable, Iterator
from zlib import adler32

from vitscale.data.tar_index import sample_offsets, seek_sample


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append ``data`` as member ``name`` with fixed header fields: the same arguments give the
    same bytes (no clock, no user, no host in the tar)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def expand(pattern: str) -> list[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


READ_BUFFER = 1 << 20  # bytes buffered per open local shard
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar-level metadata members


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def check_member_name(name: str, url: str) -> None:
    """Refuse a tar member with an absolute path or a ``..`` component: no shard we write
    has one, and a tool that extracts such a member writes outside its folder."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"shard {url}: member '{name}' has an absolute or '..' path; refusing the shard "
                         "(rewrite it with vitscale-synth, or remove the member)")


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order.

    Our own reader: webdataset's goes through Python's ``tarfile``, which costs about as much
    per sample as decoding a 256-px JPEG (benchmarks/loader_speed.py); parsing the 512-byte
    ustar headers directly takes microseconds. Handles ustar prefixes, GNU long names and
    pax ``path`` records (what Python's and GNU tar write). Raises ValueError on a bad
    checksum or a truncated member.
    """
    for _, _, name, data in _entries(stream):
        yield name, data


def _entries(stream, skip_data: bool = False) -> Iterator[tuple[int, int, str, bytes | None]]:
    """(offset where the member's headers start, offset after it, name, bytes) of each regular file,
    offsets counted from where ``stream`` stood. ``skip_data``: seek over the regular files' bytes
    (a seekable file; their bytes come as None, and a truncated last member goes unnoticed)."""
    long_name = None
    pos, chain = 0, None  # chain: where the headers of the next member began (GNU / pax headers first)
    ahead = None  # the next header, read with the padding before it (one read call fewer per member)
    while True:
        header = stream.read(512) if ahead is None else ahead
        ahead = None
        chain = pos if chain is None else chain
        pos += len(header)
        if len(header) < 512:
            if header.strip(b"\0"):
                raise ValueError("truncated tar header")
            return
        if header == b"\0" * 512:
            return  # end-of-archive marker
        try:
            stored = int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            stored = -1
        # The checksum counts its own 8 bytes as spaces (8 * 32 = 256).
        if stored != _byte_sum(header) - sum(header[148:156]) + 256:
            raise ValueError("tar header checksum mismatch (a corrupt or non-tar file)")
        raw_size = header[124:136]
        size = (int.from_bytes(raw_size[1:], "big") if raw_size[0] & 0x80 else
                int(raw_size.strip(b"\0 ") or b"0", 8))
        kind = header[156:157]
        regular = kind in (b"0", b"\0", b"7")
        if skip_data and regular:
            stream.seek(size + (-size % 512), 1)
            pos += size + (-size % 512)
            data = None
        else:
            data = stream.read(size)
            if len(data) < size:
                raise ValueError("truncated tar member")
            pad = -size % 512
            tail = stream.read(pad + 512)  # padding to the block (a missing last one ends the archive below), next header
            pos += size + min(len(tail), pad)
            ahead = tail[pad:]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header: a 'path' record renames the next member
            for record in data.decode("utf-8", "replace").split("\n"):
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[5:]
            continue
        if not regular:
            long_name, chain = None, None
            continue  # directories, links, global pax headers
        name = long_name
        if name is None:
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
        long_name = None
        yield chain, pos, name, data
        chain = None


def _byte_sum(block: bytes) -> int:
    """The sum of a 512-byte header's bytes, from zlib's Adler-32 (nothing in the standard library sums
    bytes in C; ``sum()`` iterates them in Python, a few microseconds per header): its low half is
    1 + the sum of the bytes modulo 65521, exact for 256 bytes (at most 65280)."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _sample_key(name: str, url: str) -> tuple[str, str] | None:
    """(key, extension) of a member as webdataset groups it, None for a member it skips; raises
    ValueError for an absolute or '..' name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    # Absolute or '..' paths: the shard is refused. The full check only where one of its rules can
    # apply (a leading '/', a '..', a drive letter): it costs more per member than the rest of the parse.
    if name[:1] == "/" or ".." in name or name[1:2] == ":":
        check_member_name(name, url)
    if dot < 0 or (name[:2] == "__" and _META.match(name)):  # webdataset's rule for tar-level metadata members
        return None
    return name[:dot], name[dot + 1:].lower()


def sample_starts(f, url: str) -> tuple[list[int], int, bool]:
    """(offset where each sample of the open shard ``f`` starts, offset where the scan stopped,
    whether the shard is whole: it ended at its end-of-archive or end of file without a refused
    or truncated member): what ``tar_index`` caches. Reads the headers only."""
    offsets: list[int] = []
    key, end, last, clean = None, 0, 0, True
    try:
        for chain, after, name, _ in _entries(f, skip_data=True):
            parts = _sample_key(name, url)
            if parts is not None and parts[0] != key:
                key = parts[0]
                offsets.append(chain)
            end, last = after, chain
    except ValueError:
        clean = False  # the reader fails at ``end`` too
    if end > f.seek(0, 2):  # the last member's bytes were seeked over, past the end: it is truncated
        end, clean = last, False
    return offsets, end, clean


def read_tar_samples(url: str, start: int = 0) -> Iterator[dict]:
    """Samples of one shard as webdataset groups them: consecutive members with the same
    key (the name up to the first dot of its basename), ``{"__key__", "__url__", "__index__"
    (the sample's place in the shard), ext: bytes}``. Local paths, ``pipe:`` and http(s) URLs
    open through webdataset's ``gopen``.

    ``start``: the first sample to yield. A local shard is seeked to it (``tar_index``: the
    shard's sample offsets, built once and cached); a remote one is read from its start."""
    from webdataset.gopen import gopen

    local = not is_remote(url)
    seek = start > 0 and local
    # A 1 MiB buffer: a sample's members come in one read call, not one per member (gopen's local
    # files get Python's 8 KiB buffer, whatever its bufsize says).
    with (open(url, "rb", buffering=READ_BUFFER) if local else gopen(url, "rb")) as stream:
        if seek:
            seek_sample(stream, url, start, sample_starts)
        index = start if seek else 0
        sample: dict | None = None
        for name, data in tar_members(stream):
            parts = _sample_key(name, url)
            if parts is None:
                continue
            key, ext = parts
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    if sample["__index__"] >= start:
                        yield sample
                    index += 1
                sample = {"__key__": key, "__url__": url, "__index__": index}
            sample[ext] = data
        if sample is not None and sample["__index__"] >= start:
            yield sample


def _group_one(data: bytes, url: str, index: int) -> dict:
    """The sample whose members are the tar bytes ``data`` (one sample's span of a shard)."""
    sample = {"__url__": url, "__index__": index}
    for name, member in tar_members(io.BytesIO(data)):
        parts = _sample_key(name, url)
        if parts is not None:
            sample["__key__"], sample[parts[1]] = parts[0], member
    return sample


def shard_share(urls: list[str], rank: int, world: int, limit: int = 0,
                on_error: Callable[[str, Exception], None] | None = None) -> Iterator[dict]:
    """Every ``world``-th sample, from the ``rank``-th, of the shards ``urls`` read one after another
    (the samples ``read_tar_samples`` yields, numbered across the shards; only those numbered below
    ``limit`` where it is > 0), reading only this share's bytes: a whole local shard is indexed
    (``tar_index``) and each of its samples read by seeking to its span. A remote or damaged shard is
    read through and the other samples skipped.

    ``on_error(url, exception)``: a shard that cannot be read (raises when None) is reported by one
    rank only (the shard's place modulo ``world``), and the numbering goes on after the samples it gave.
    """
    base = 0  # samples in the shards before this one
    for place, url in enumerate(urls):
        if limit and base >= limit:
            return
        index = None
        if not is_remote(url):
            try:
                index = sample_offsets(url, sample_starts)
            except OSError:
                index = None  # unreadable: read through below, which reports it
        if index is not None and index["clean"]:
            spans = index["offsets"] + [index["end"]]
            first = (rank - base) % world
            with open(url, "rb") as f:
                for j in range(first, len(index["offsets"]), world):
                    if limit and base + j >= limit:
                        break
                    f.seek(spans[j])
                    yield _group_one(f.read(spans[j + 1] - spans[j]), url, j)
            base += len(index["offsets"])
            continue
        count = 0
        try:
            for sample in read_tar_samples(url):
                if limit and base + count >= limit:
                    break
                if (base + count) % world == rank:
                    yield sample
                count += 1
        except (OSError, ValueError, EOFError) as exc:
            if on_error is None:
                raise
            if place % world == rank:
                on_error(url, exc)
        base += count


def tar_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """``read_tar_samples`` over ``{"url": ...}`` dicts, one shard after another (raw bytes, no
    decoding, so nothing is unpickled)."""
    for entry in urls:
        yield from read_tar_samples(entry["url"])
