"""Atomic file writes: a reader (a resumed run, another rank, a user) sees a whole file or the old
one, never half of it. One place for what the run folder, checkpoints, exports and shard sets need."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path`` that no other process picks: host and pid in it, since ranks on
    several nodes may write the same file on a shared file system."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


@contextlib.contextmanager
def replacing(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` in
    one rename, on an exception it is removed and ``path`` stays as it was.

    Args:
        path: the file to (re)write; its folder must exist.
        fsync: flush the bytes and the folder entry to disk before returning (a file whose
            existence others rely on, such as a finished shard).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to write ``path``'s new content into; on success it takes
    ``path``'s place by renames (an existing ``path`` is moved aside first, then removed), so a
    reader never sees a half-written folder; on an exception it is removed and ``path`` stays.

    Args:
        path: the folder to (re)write; its parent must exist; it must not be a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give a folder (or a name that does not exist)")
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f"{tmp.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with replacing(path) as tmp:
        tmp.write_text(text)
