"""Test helpers for tar shards: write one from (name, bytes) members; count what the tar reader parses."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import vitscale.data.tars as tars


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """Write ``members`` in order as a tar file at ``path``; returns its bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def count_tar_members(monkeypatch) -> dict[str, int]:
    """From now on (until ``monkeypatch`` undoes it), count the members and bytes the tar reader
    (``tars.tar_members``, as it is now) parses; returns the live counts."""
    parsed = {"members": 0, "bytes": 0}
    members = tars.tar_members

    def counted(stream):
        for name, data in members(stream):
            parsed["members"] += 1
            parsed["bytes"] += len(data)
            yield name, data

    monkeypatch.setattr(tars, "tar_members", counted)
    return parsed
