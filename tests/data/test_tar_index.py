"""Seeking in tar shards (``data/tar_index.py``, ``tars.read_tar_samples(url, start)``): every start
gives the samples reading the whole shard gives from there, for every tar flavour we read; the
index is JSON, cached beside the shard, rebuilt when the shard changes; a truncated or refused
shard fails at the same sample."""
import io
import json
import os
import tarfile

import pytest

from vitscale.data import tar_index
from vitscale.data.tars import read_tar_samples


def _write(path, members, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _members(n):
    out = [("__meta__/info.json", b"{}")]  # a tar-level member webdataset skips
    for i in range(n):
        key = f"dir/{'long' * 40}{i:04d}" if i % 3 == 0 else f"s{i:04d}"  # > 100 chars: GNU long names / pax
        out += [(f"{key}.jpg", bytes([i % 256]) * (100 + 37 * i)), (f"{key}.txt", f"caption {i}".encode())]
        if i % 4 == 0:
            out.append(("README", b"no dot: skipped"))
    return out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_every_start_gives_the_tail_of_the_whole_read(tmp_path, fmt):
    members = _members(23)
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits names into prefix / name: keep them under 100 per part
        members = [(n.replace("long" * 40, "l" * 80), d) for n, d in members]
    shard = tmp_path / "s.tar"
    _write(shard, members, fmt)
    whole = list(read_tar_samples(str(shard)))
    assert len(whole) == 23 and [s["__index__"] for s in whole] == list(range(23))
    for start in range(26):
        assert list(read_tar_samples(str(shard), start)) == whole[start:], start


def test_the_index_is_json_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path):
    shard = tmp_path / "s.tar"
    _write(shard, _members(5))
    assert [s["__key__"] for s in read_tar_samples(str(shard), 3)] == ["dir/" + "long" * 40 + "0003", "s0004"]
    cached = tmp_path / "s.tar.idx.json"
    index = json.loads(cached.read_text())  # JSON: reading it runs no code
    assert index["format"] == "vitscale-tar-index" and len(index["offsets"]) == 5
    assert index["size"] == shard.stat().st_size
    # Each offset is where a sample's first header (here a GNU long-name header) starts: a 512-byte block.
    raw = shard.read_bytes()
    assert all(o % 512 == 0 for o in index["offsets"]) and raw[index["offsets"][3] + 156:index["offsets"][3] + 157] == b"L"
    _write(shard, _members(8))  # rewritten: another size, another mtime
    os.utime(shard, ns=(1, 1))
    tar_index._memory.clear()  # as a new process sees it
    assert [s["__index__"] for s in read_tar_samples(str(shard), 6)] == [6, 7]
    assert len(json.loads(cached.read_text())["offsets"]) == 8


def test_a_truncated_or_refused_shard_fails_at_the_same_sample(tmp_path):
    shard = tmp_path / "cut.tar"
    whole = _write(shard, _members(6))
    cut = whole.index(b"s0004.jpg") + 512 + 50  # inside sample 4's image
    shard.write_bytes(whole[:cut])


    def read(start):
        got = []
        with pytest.raises(ValueError, match="truncated tar member"):
            for s in read_tar_samples(str(shard), start):
                got.append(s["__index__"])
        return got

    assert read(0) == [0, 1, 2]  # sample 3 is complete only when sample 4 starts, where the cut is
    for start in (1, 2, 3, 4, 5, 9):
        assert read(start) == list(range(start, 3)), start
    bad = tmp_path / "dotdot.tar"
    _write(bad, [("a.txt", b"x"), ("a.jpg", b"y"), ("b.txt", b"w"), ("../evil.txt", b"z"), ("c.txt", b"v")])
    for start in (0, 1, 2, 3):
        with pytest.raises(ValueError, match="'..' path"):
            list(read_tar_samples(str(bad), start))
