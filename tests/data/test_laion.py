"""The image-text loader: img2dataset shards, bad samples, splitting, exact resume, filters, formats."""
import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.data.captions import CaptionTokenizer
from vitscale.data.laion import (LaionLoader, LaionStream, Position, SampleFilter, check_filters, describe_stats,
                                 resolve_sources)
from vitscale.data.laion_sample import write_laion_sample
from vitscale.data.transforms import crop_resize

from tests.tarfiles import write_tar

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = CaptionTokenizer(vocab_size=100, context_length=16)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("laion")
    write_laion_sample(out, classes=10, instances=64, val_instances=8, size=48, shard_size=80)
    return out


def _keys_of(sources, micro, rank, world, workers, batches, **kw):
    stream = LaionStream(sources, TOKENIZER, micro, rank, world, 48, seed=3, workers=workers, **kw)
    loader = LaionLoader(stream, workers)
    it, keys = iter(loader), []
    for _ in range(batches):
        next(it)
        keys.append(list(loader.last_keys))
    return keys, loader


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _sample(key: str, image: bytes | None = None, caption: str | None = "a caption of three words"):
    out = [(f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}", "similarity": 0.3}).encode())]
    if image is not None:
        out.append((f"{key}.jpg", image))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    return out


@pytest.fixture
def bad_set(tmp_path) -> tuple[Path, set[str]]:
    """Shard 0: 3 good, a corrupt JPEG, a missing caption. Shard 1: empty. Shard 2: truncated
    in its third sample (2 good before the cut). Sizes as img2dataset's _stats.json claims."""
    members = (_sample("0000", _jpeg(0)) + _sample("0001", b"\xff\xd8\xff\xe0 not a jpeg") + _sample("0002", _jpeg(2))
               + _sample("0003", _jpeg(3), caption=None) + _sample("0004", _jpeg(4)))
    write_tar(tmp_path / "00000.tar", members)
    write_tar(tmp_path / "00001.tar", [])
    whole = write_tar(tmp_path / "00002.tar", _sample("2000", _jpeg(5)) + _sample("2001", _jpeg(6)) + _sample("2002", _jpeg(7))
                 + _sample("2003", _jpeg(8)))
    cut = whole.index(b"2002.jpg") + 512 + 300  # inside the third sample's image
    (tmp_path / "00002.tar").write_bytes(whole[:cut])
    for shard, n in (("00000", 5), ("00001", 0), ("00002", 4)):
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    return tmp_path, {"0000", "0002", "0004", "2000", "2001"}


def test_bad_samples_are_skipped_counted_and_the_stream_goes_on(bad_set):
    folder, good = bad_set
    sources = resolve_sources(str(folder / "{00000..00002}.tar"))
    assert sources[0].sizes == [5, 0, 4]
    # Exact epochs, one reader: an epoch is 9 samples (the sizes) of which 5 are good.
    stream = LaionStream(sources, TOKENIZER, 1, 0, 1, 48, seed=3, resampled=False, shuffle_buffer=0)
    loader = LaionLoader(stream, 1)
    it = iter(loader)
    first_pass = []
    for _ in range(5):
        next(it)
        first_pass += loader.last_keys
    assert sorted(first_pass) == sorted(good)
    stats = loader.stats()
    assert stats["decode_error"] == 1 and stats["missing_caption"] == 1 and stats["kept"] == 5
    text = describe_stats(stats)
    assert "bad samples skipped" in text and "1 decode_error" in text and "1 missing_caption" in text
    for _ in range(7):  # the run goes on: the epoch's quota of 9 is filled from the good samples again
        next(it)
        assert set(loader.last_keys) <= good
    assert loader.stats()["repeated"] >= 4
    assert loader.stats()["read_error"] >= 1  # the truncated tar, met after its last good sample


def test_exact_epochs_split_over_data_ranks_and_workers(sample_set):
    sources = resolve_sources(str(sample_set / "{00000..00007}.tar"))
    total = sources[0].num_samples
    assert total == 608  # the _stats.json 'successes' (5 failed downloads per shard are not in the tars)
    micro, world = 8, 2
    per_rank = total // (world * micro)  # 38 batches on every rank
    seen, counts = [], []
    for rank in range(world):
        keys, _ = _keys_of(sources, micro, rank, world, 2, per_rank, resampled=False, shuffle_buffer=64)
        counts.append(len(keys))
        seen += [k for batch in keys for k in batch]
    assert counts == [per_rank] * world
    assert len(seen) == len(set(seen)) == world * micro * per_rank == total  # each sample once in the epoch


def test_resampling_honours_the_epoch_length(sample_set):
    sources = resolve_sources(str(sample_set / "{00000..00007}.tar"))
    # 100 samples per epoch over 2 ranks of micro-batches of 8: ceil(100 / 16) = 7 batches per rank.
    stream = LaionStream(sources, TOKENIZER, 8, 0, 2, 48, seed=1, resampled=True, epoch_samples=100, workers=2)
    assert stream.rank_batches == 7 and [stream.quota(w) for w in range(2)] == [4, 3]
    loader = LaionLoader(stream, 2)
    it = iter(loader)
    for _ in range(7):
        next(it)
    counters = lambda: {w: {k: p[k] for k in ("epoch", "batch", "taken")}  # noqa: E731 (the seek place aside)
                        for w, p in loader.state_dict()["positions"].items()}
    assert counters() == {"0": {"epoch": 0, "batch": 4, "taken": 32}, "1": {"epoch": 0, "batch": 3, "taken": 24}}
    next(it)  # the 8th batch is worker 1's (round-robin): its quota of 3 is spent, so it opens epoch 1
    assert counters()["1"] == {"epoch": 1, "batch": 1, "taken": 8}


@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_resume_sees_the_keys_of_an_uninterrupted_run(sample_set, resampled):
    sources = resolve_sources(str(sample_set / "{00000..00007}.tar"))
    kw = dict(resampled=resampled, epoch_samples=200, shuffle_buffer=50, filters={"min_similarity": 0.25})
    straight, _ = _keys_of(sources, 8, 1, 2, 2, 25, **kw)  # crosses an epoch boundary (13 batches per rank)
    first, loader = _keys_of(sources, 8, 1, 2, 2, 11, **kw)  # stop after 11: the round-robin resumes at worker 1
    state = json.loads(json.dumps(loader.state_dict()))  # as it travels through a checkpoint
    stream = LaionStream(sources, TOKENIZER, 8, 1, 2, 48, seed=3, workers=2, state=state, **kw)
    resumed = LaionLoader(stream, 2)
    it = iter(resumed)
    rest = []
    for _ in range(14):
        next(it)
        rest.append(list(resumed.last_keys))
    assert first + rest == straight
    _, whole = _keys_of(sources, 8, 1, 2, 2, 25, **kw)
    assert resumed.stats() == whole.stats()  # the counters continue too


def test_resume_refuses_another_layout(sample_set):
    sources = resolve_sources(str(sample_set / "{00000..00007}.tar"))
    _, loader = _keys_of(sources, 8, 0, 2, 2, 3, resampled=False, shuffle_buffer=0)
    with pytest.raises(ValueError, match="same data-parallel size and data.num_workers"):
        LaionStream(sources, TOKENIZER, 8, 0, 1, 48, seed=3, workers=2, resampled=False, state=loader.state_dict())


def _meta_of(sample_set: Path) -> dict:
    table = pq.read_table(sample_set / "00000.parquet").to_pylist()
    return {row["key"]: row for row in table if row["status"] == "success"}


def test_filters_keep_exactly_the_samples_they_should(sample_set):
    sources = resolve_sources(str(sample_set / "00000.tar"))
    meta = _meta_of(sample_set)
    cases = {
        "min_similarity": ({"min_similarity": 0.3}, lambda m: m["similarity"] >= 0.3),
        "min_image_size": ({"min_image_size": 100}, lambda m: min(m["original_width"], m["original_height"]) >= 100),
        "where": ({"where": ["label < 4", "similarity != 0.3"]}, lambda m: m["label"] < 4 and m["similarity"] != 0.3),
    }
    for name, (filters, keep) in cases.items():
        want = sorted(k for k, m in meta.items() if keep(m))
        assert 0 < len(want) < len(meta), name  # the filter has something to do
        stream = LaionStream(sources, TOKENIZER, 1, 0, 1, 48, seed=0, resampled=False, shuffle_buffer=0,
                             filters=filters)
        got, stats = [], None
        for _, _, _, info in stream._epoch(0, 0, Position(), collections.Counter()):
            if info["counts"]["repeated"]:
                break
            got.append(info["keys"][0])
            stats = info["counts"]
        assert sorted(got) == want, name
        assert stats["kept"] == len(want) and stats["kept"] + stats["filtered"] == stats["read"], name


def test_caption_length_filter():
    f = SampleFilter({"min_caption_words": 3, "max_caption_words": 5})
    assert [f.reason(c, None, "k") for c in ("a b", "a b c", "a b c d e", "a b c d e f")] == [
        "filtered", None, None, "filtered"]


def test_dedupe_drops_repeated_urls_within_the_window():
    f = SampleFilter({"dedupe": "url", "dedupe_window": 2})
    urls = ["a", "b", "a", "c", "d", "a"]
    assert [f.reason("x y z", {"url": u}, str(i)) for i, u in enumerate(urls)] == [
        None, None, "duplicate", None, None, None]  # the last 'a' fell out of the 2-sample window


@pytest.mark.parametrize("bad, message", [
    ({"min_sim": 0.3}, "min_sim is not a filter"),
    ({"where": ["punsafe ~ 0.5"]}, "FIELD OP NUMBER"),
    ({"dedupe": "hash"}, "'url' or 'key'"),
    ({"min_similarity": "high"}, "must be a number"),
])
def test_bad_filters_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        check_filters(bad)


def test_laion_sample_is_in_img2datasets_format(sample_set):
    with tarfile.open(sample_set / "00000.tar") as tar:
        names = tar.getnames()
    keys = sorted({n.split(".")[0] for n in names})
    assert all(len(k) == 9 and k.startswith("00000") for k in keys)
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    stats = json.loads((sample_set / "00000_stats.json").read_text())
    rows = pq.read_table(sample_set / "00000.parquet").to_pylist()
    assert stats["successes"] == len(keys) == sum(r["status"] == "success" for r in rows)
    assert stats["count"] == len(rows) > len(keys)  # failed downloads are listed, not stored
    assert {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
            "original_height", "exif", "sha256", "similarity"} <= set(rows[0])
    assert (sample_set / "classnames.txt").read_text().splitlines()[3] == "gratings pattern of kind three"


def test_crop_resize_matches_pil_on_a_smooth_image():
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    img = np.asarray(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(3))).copy()
    ref = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR, box=(4, 8, 52, 56)))
    out = crop_resize(torch.from_numpy(img).permute(2, 0, 1)[None], torch.tensor([[4.0, 8, 52, 56, 0]]), 32)
    assert np.abs(out[0].permute(1, 2, 0).numpy() - ref).mean() < 1.0  # different filters, same picture
    flipped = crop_resize(torch.from_numpy(img).permute(2, 0, 1)[None], torch.tensor([[0.0, 0, 64, 64, 1]]), 64)
    assert torch.equal(flipped[0].permute(1, 2, 0), torch.from_numpy(img[:, ::-1].copy()).float())


def test_laion_configs_are_checked(sample_set):
    shards = f"data.shards={sample_set}/{{00000..00007}}.tar"
    cfg = load_experiment(ROOT / "configs/clip_tiny_laion.yaml", [shards, "eval.every=0"]).cfg
    assert cfg.data.source == "laion"
    with pytest.raises(ConfigError, match="a classifier"):
        load_experiment(ROOT / "configs/vit_tiny.yaml", ["data.source=laion", shards])
    with pytest.raises(ConfigError, match="shard .*00099.tar does not exist"):
        load_experiment(ROOT / "configs/clip_tiny_laion.yaml", [f"data.shards={sample_set}/{{00000..00099}}.tar"])
    with pytest.raises(ConfigError, match="data.resampled=true"):
        load_experiment(ROOT / "configs/clip_tiny_laion.yaml", [
            f"data.shards=[{{pattern: '{sample_set}/00000.tar', weight: 1}}, "
            f"{{pattern: '{sample_set}/00001.tar', weight: 3}}]", "eval.every=0"])
    with pytest.raises(ConfigError, match="parallel.pipe=1"):
        load_experiment(ROOT / "configs/clip_tiny_laion.yaml", [shards, "parallel.pipe=2", "eval.every=10",
                                                                f"eval.zeroshot={sample_set}/val"])


def test_sources_mix_by_weight_when_resampled(sample_set):
    sources = resolve_sources([{"pattern": str(sample_set / "{00000..00003}.tar"), "weight": 1},
                               {"pattern": str(sample_set / "{00004..00007}.tar"), "weight": 3}])
    stream = LaionStream(sources, TOKENIZER, 16, 0, 1, 48, resampled=True, epoch_samples=10_000)
    draws = [url for url, _ in zip(stream.resampled_urls(0, 0), range(4000))]
    second = np.mean([url in sources[1].urls for url in draws])
    assert abs(second - 0.75) < 0.03  # binomial std 0.007
    assert len(set(draws)) == 8  # every shard of both sources drawn
    keys, _ = _keys_of(sources, 16, 0, 1, 1, 10, resampled=True, epoch_samples=10_000, shuffle_buffer=100)
    assert len({k for batch in keys for k in batch}) > 100  # samples flow from the draws


def test_pipe_urls_and_sizes_json(sample_set, tmp_path):
    local, _ = _keys_of(resolve_sources(str(sample_set / "{00000..00001}.tar")), 4, 0, 1, 1, 10, resampled=False,
                        shuffle_buffer=0)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 76, "00001.tar": 76}))
    piped = resolve_sources({"pattern": f"pipe:cat {sample_set}/{{00000..00001}}.tar",
                             "sizes": str(tmp_path / "sizes.json")})
    assert piped[0].sizes == [76, 76]
    remote, _ = _keys_of(piped, 4, 0, 1, 1, 10, resampled=False, shuffle_buffer=0)
    assert remote == local
    with pytest.raises(ValueError, match="need every shard's size"):
        LaionStream(resolve_sources(f"pipe:cat {sample_set}/00000.tar"), TOKENIZER, 4, 0, 1, 48, resampled=False)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_our_tar_reader_groups_samples_as_webdataset_does(tmp_path, fmt):
    import webdataset as wds

    from vitscale.data.tars import read_tar_samples

    deep = "d" * 60 + "/" + "e" * 70  # a path over 100 characters: prefix field, GNU long name or pax path
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in [(f"{deep}/a.jpg", b"1"), (f"{deep}/a.txt", b"x"), ("b.json", b"{}"), ("b.TXT", b"y"),
                           ("__index__", b"skipped"), ("c.seg.png", b"2" * 1000)]:
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    ours = [{k: v for k, v in s.items() if k not in ("__url__", "__index__")} for s in read_tar_samples(str(tmp_path / "s.tar"))]
    theirs = [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
              for s in wds.tarfile_to_samples()([{"url": str(tmp_path / "s.tar")}]) if "__key__" in s]
    assert ours == theirs and len(ours) == 3
    (tmp_path / "not.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="checksum"):
        list(read_tar_samples(str(tmp_path / "not.tar")))


def test_a_shard_with_a_dotdot_member_is_refused_and_counted(tmp_path):
    write_tar(tmp_path / "00000.tar", _sample("0000", _jpeg(0)) + [("../evil.txt", b"x")] + _sample("0001", _jpeg(1)))
    write_tar(tmp_path / "00001.tar", _sample("1000", _jpeg(2)))
    stream = LaionStream(resolve_sources(str(tmp_path / "{00000..00001}.tar"), sizes=False), TOKENIZER, 1, 0, 1, 48,
                         resampled=True, epoch_samples=2, shuffle_buffer=0)
    loader = LaionLoader(stream, 0)
    it = iter(loader)
    keys = [next(it) and loader.last_keys[0] for _ in range(6)]
    assert "0001" not in keys and "1000" in keys  # nothing after the bad member is read
    assert loader.stats()["read_error"] >= 1


@pytest.mark.parametrize("resampled", [False, True], ids=["exact", "resampled"])
def test_resume_reads_one_shuffle_block_not_the_epoch_so_far(sample_set, monkeypatch, resampled):
    # 1 rank, 1 worker, micro-batch 8, shuffle blocks of 20 raw samples: stopped after 60 batches (480 of the
    # 608 samples, ~80% of the exact epoch), the resumed stream must read at most the checkpoint's block and
    # the next one before its first batch (<= 40 samples parsed), not the 480 before it; and be exact.
    import vitscale.data.tars as tars

    sources = resolve_sources(str(sample_set / "{00000..00007}.tar"))
    kw = dict(resampled=resampled, epoch_samples=608, shuffle_buffer=20)
    straight, _ = _keys_of(sources, 8, 0, 1, 1, 64, **kw)
    first, loader = _keys_of(sources, 8, 0, 1, 1, 60, **kw)
    state = json.loads(json.dumps(loader.state_dict()))
    parsed = collections.Counter()
    members = tars.tar_members

    def counted(stream):
        for name, data in members(stream):
            parsed["members"] += 1
            yield name, data

    monkeypatch.setattr(tars, "tar_members", counted)
    # no worker process (num_workers=0): the counter sees this process's reads
    resumed = LaionLoader(LaionStream(sources, TOKENIZER, 8, 0, 1, 48, seed=3, workers=1, state=state, **kw), 0)
    it = iter(resumed)
    next(it)
    samples_parsed = parsed["members"] / 3  # jpg, txt, json per sample
    assert 8 <= samples_parsed <= 2 * 20 + 1, samples_parsed
    rest = [list(resumed.last_keys)]
    for _ in range(3):
        next(it)
        rest.append(list(resumed.last_keys))
    assert first + rest == straight
    _, whole = _keys_of(sources, 8, 0, 1, 1, 64, **kw)
    assert resumed.stats() == whole.stats()


def test_train_box_is_the_generic_crop_and_flip_of_the_sample_generator():
    # train_box inlines splitmix64 and random_resized_crop_box: the reference is the two functions it replaces.
    from vitscale.data.laion import SampleRng, train_box
    from vitscale.data.synthetic_loader import random_resized_crop_box

    rng = np.random.default_rng(0)
    for i in range(3000):
        w, h = (256, 256) if i % 3 == 0 else (int(rng.integers(1, 400)), int(rng.integers(1, 400)))
        scale = [(0.9, 1.0), (0.08, 1.0), (1.0, 1.0)][i % 3]
        ratio = [(3 / 4, 4 / 3), (1.0, 1.0), (0.2, 5.0)][i % 3]
        hflip = [0.0, 0.5, 1.0][i % 3]
        seed = int(rng.integers(0, 2 ** 63)) * 1_000_003 + i  # as _epoch seeds it: may pass 64 bits
        aug = SampleRng(seed)
        expected = (*random_resized_crop_box(w, h, aug, scale, ratio), aug.random() < hflip)
        assert train_box(seed, w, h, scale, ratio, hflip) == expected, (seed, w, h, scale, ratio)


def test_batch_buffers_are_reused_only_once_no_one_holds_the_batch(sample_set):
    from vitscale.data.laion import BatchBuffers

    buffers = BatchBuffers((2, 4, 4, 3))
    first = torch.from_numpy(buffers.take())
    view = first[1:]  # a view of the batch keeps it held
    second = torch.from_numpy(buffers.take())
    assert second.data_ptr() != first.data_ptr()
    address = first.data_ptr()
    del first
    assert torch.from_numpy(buffers.take()).data_ptr() != address  # still held through the view
    del view
    assert torch.from_numpy(buffers.take()).data_ptr() == address  # dropped: handed out again
    # In the stream: batches a consumer keeps are never written again, whatever it keeps.
    stream = LaionStream(resolve_sources(str(sample_set / "{00000..00007}.tar")), TOKENIZER, 8, 0, 1, 48, seed=3,
                         resampled=False, shuffle_buffer=20)
    kept = []
    for i, (images, _, _, _) in enumerate(stream._epoch(0, 0, Position(), collections.Counter())):
        if i % 3 == 0:
            kept.append((images, images.clone()))
        if i == 12:
            break
    assert all(torch.equal(batch, copy) for batch, copy in kept)
