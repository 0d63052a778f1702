"""Seeking in tar shards (``data/tar_index.py``, ``tars.read_tar_samples(url, start)``): every start
gives the samples reading the whole shard gives from there, for every tar flavour we read; the
index is JSON, cached beside the shard, rebuilt when the shard changes; a truncated or refused
shard fails at the same sample."""
import json
import os
import tarfile

import pytest

from vitscale.data import tar_index
from vitscale.data.tars import read_tar_samples

from tests.tarfiles import count_tar_members, write_tar


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
    write_tar(shard, members, fmt)
    whole = list(read_tar_samples(str(shard)))
    assert len(whole) == 23 and [s["__index__"] for s in whole] == list(range(23))
    for start in range(26):
        assert list(read_tar_samples(str(shard), start)) == whole[start:], start


def test_the_index_is_json_beside_the_shard_and_rebuilt_when_the_shard_changes(tmp_path):
    shard = tmp_path / "s.tar"
    write_tar(shard, _members(5))
    assert [s["__key__"] for s in read_tar_samples(str(shard), 3)] == ["dir/" + "long" * 40 + "0003", "s0004"]
    cached = tmp_path / "s.tar.idx.json"
    index = json.loads(cached.read_text())  # JSON: reading it runs no code
    assert index["format"] == "vitscale-tar-index" and len(index["offsets"]) == 5
    assert index["size"] == shard.stat().st_size
    # Each offset is where a sample's first header (here a GNU long-name header) starts: a 512-byte block.
    raw = shard.read_bytes()
    assert all(o % 512 == 0 for o in index["offsets"]) and raw[index["offsets"][3] + 156:index["offsets"][3] + 157] == b"L"
    write_tar(shard, _members(8))  # rewritten: another size, another mtime
    os.utime(shard, ns=(1, 1))
    tar_index._memory.clear()  # as a new process sees it
    assert [s["__index__"] for s in read_tar_samples(str(shard), 6)] == [6, 7]
    assert len(json.loads(cached.read_text())["offsets"]) == 8


def test_a_truncated_or_refused_shard_fails_at_the_same_sample(tmp_path):
    shard = tmp_path / "cut.tar"
    whole = write_tar(shard, _members(6))
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
    write_tar(bad, [("a.txt", b"x"), ("a.jpg", b"y"), ("b.txt", b"w"), ("../evil.txt", b"z"), ("c.txt", b"v")])
    for start in (0, 1, 2, 3):
        with pytest.raises(ValueError, match="'..' path"):
            list(read_tar_samples(str(bad), start))


def _shards(tmp_path):
    """Three clean shards of 7, 5 and 9 samples, a truncated one (3 samples given before the cut) and
    one refused for a '..' member after 2 samples; the truncated and refused ones sit between clean ones."""
    urls = []
    for i, n in enumerate((7, 5)):
        urls.append(str(tmp_path / f"{i}.tar"))
        write_tar(tmp_path / f"{i}.tar", [(f"k{i}_{j:03d}.{ext}", f"{i}-{j}-{ext}".encode() * (j + 1))
                                       for j in range(n) for ext in ("jpg", "txt")])
    whole = write_tar(tmp_path / "cut.tar", _members(6))
    (tmp_path / "cut.tar").write_bytes(whole[:whole.index(b"s0004.jpg") + 512 + 50])
    urls.append(str(tmp_path / "cut.tar"))
    write_tar(tmp_path / "bad.tar", [("a.txt", b"x"), ("b.txt", b"y"), ("../evil.txt", b"z"), ("c.txt", b"w")])
    urls.append(str(tmp_path / "bad.tar"))
    write_tar(tmp_path / "3.tar", [(f"k3_{j:03d}.{ext}", b"%d" % j * 50) for j in range(9) for ext in ("jpg", "txt")])
    urls.append(str(tmp_path / "3.tar"))
    return urls


@pytest.mark.parametrize("limit", [0, 15])
def test_each_rank_reads_only_its_share_and_the_shares_make_the_whole(tmp_path, monkeypatch, limit):
    import vitscale.data.tars as tars
    from vitscale.data.tars import shard_share

    urls = _shards(tmp_path)
    # the reference: every sample read_tar_samples gives, shard after shard, numbered across shards
    reference = []
    for url in urls:
        try:
            for s in read_tar_samples(url):
                reference.append((s["__url__"], s["__index__"], s["__key__"], s.get("jpg")))
        except ValueError:
            pass
    assert len(reference) == 7 + 5 + 3 + 1 + 9  # bad.tar: 'b' is lost with the refused member after it
    if limit:
        reference = reference[:limit]
    members = tars.tar_members
    damaged = []  # members parsed reading the damaged shards through (up to their error), which every rank does
    monkeypatch.setattr(tars, "tar_members", lambda stream: (damaged.append(m[0]) or m for m in members(stream)))
    for url in urls[2:4]:
        with pytest.raises(ValueError):
            list(read_tar_samples(url))
    damaged = len(damaged)
    monkeypatch.setattr(tars, "tar_members", members)
    for world in (1, 2, 3):
        union, errors = [], []
        for rank in range(world):
            parsed = count_tar_members(monkeypatch)
            got = [(s["__url__"], s["__index__"], s["__key__"], s.get("jpg"))
                   for s in shard_share(urls, rank, world, limit, lambda url, exc: errors.append(url))]
            monkeypatch.setattr(tars, "tar_members", members)
            assert got == reference[rank::world], (world, rank)
            union += got
            if world == 3 and not limit:
                # the clean shards' samples are read by their owner only: this rank parses its share of
                # their members (2 per sample), plus the damaged shards' members, which every rank reads through
                clean = sum(1 for u, *_ in got if not u.endswith(("cut.tar", "bad.tar")))
                assert parsed["members"] == 2 * clean + damaged, (parsed, clean, damaged)
        assert sorted(union, key=str) == sorted(reference, key=str)
        # an unreadable shard is reported once (by one rank), whichever the number of ranks
        # (with the first 15 samples: cut.tar's error comes before a 16th sample, bad.tar is not reached)
        assert sorted(errors) == sorted(u for u in urls if u.endswith(("cut.tar",) if limit else ("cut.tar", "bad.tar")))
