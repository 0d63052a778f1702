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
from typing import Iterable, Iterator


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
    long_name = None
    while True:
        header = stream.read(512)
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
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ValueError("tar header checksum mismatch (a corrupt or non-tar file)")
        raw_size = header[124:136]
        size = (int.from_bytes(raw_size[1:], "big") if raw_size[0] & 0x80 else
                int(raw_size.strip(b"\0 ") or b"0", 8))
        data = stream.read(size)
        if len(data) < size:
            raise ValueError("truncated tar member")
        stream.read(-size % 512)  # padding to the block; a missing last one ends the archive below
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header: a 'path' record renames the next member
            for record in data.decode("utf-8", "replace").split("\n"):
                _, _, kv = record.partition(" ")
                if kv.startswith("path="):
                    long_name = kv[5:]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global pax headers
        name = long_name
        if name is None:
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                name = header[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
        long_name = None
        yield name, data


def read_tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard as webdataset groups them: consecutive members with the same
    key (the name up to the first dot of its basename), ``{"__key__", "__url__", ext: bytes}``.
    Local paths, ``pipe:`` and http(s) URLs open through webdataset's ``gopen``."""
    from webdataset.gopen import gopen

    with gopen(url, "rb") as stream:
        sample: dict | None = None
        for name, data in tar_members(stream):
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            check_member_name(name, url)  # absolute or '..' paths: the shard is refused
            if dot < 0 or _META.match(name):  # webdataset's rule for tar-level metadata members
                continue
            key, ext = name[:dot], name[dot + 1:].lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample is not None:
            yield sample


def tar_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """``read_tar_samples`` over ``{"url": ...}`` dicts, one shard after another (raw bytes, no
    decoding, so nothing is unpickled)."""
    for entry in urls:
        yield from read_tar_samples(entry["url"])
