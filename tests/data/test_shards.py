"""Synthetic shards: writing (counts, keys, bytes, resume, workers, ranks) and the shard loader."""
import dataclasses
import hashlib
import io
import json
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vitscale.config import DataConfig
from vitscale.data import shards as sh
from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic_loader import (ShardStream, build_shard_loader, build_train_loader,
                                            random_resized_crop_box)

CLASSES, INSTANCES, SIZE, SHARD = 10, 7, 32, 16  # 70 samples in 5 shards, the last one of 6


def _spec(**kw) -> sh.DatasetSpec:
    args = dict(generator="gratings", classes=CLASSES, instances=INSTANCES, seed=3, image_size=SIZE, shard_size=SHARD)
    return sh.DatasetSpec(**{**args, **kw})


def _write(out: Path, spec: sh.DatasetSpec | None = None, workers: int = 1, rank: int = 0, world: int = 1) -> Path:
    spec = spec or _spec()
    build = partial(create_generator, spec.generator, spec.classes, spec.image_size, spec.seed)
    sh.prepare_out_dir(spec, out)
    sh.write_shards(build, spec, out, sh.claim_shards(spec, out, rank, world), workers)
    sh.finish_dataset(spec, out)
    return out


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(sh.SHARD_GLOB))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("gratings"))


def test_counts_keys_order_and_description(dataset):
    spec = _spec()
    assert sorted(_shard_bytes(dataset)) == [f"shard-{s:06d}.tar" for s in range(5)]
    samples = list(wds.WebDataset(str(dataset / "shard-{000000..000004}.tar"), shardshuffle=False))
    assert len(samples) == CLASSES * INSTANCES
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    gen = create_generator("gratings", CLASSES, SIZE, seed=3)
    for i, s in enumerate(samples):  # index i -> (i % classes, i // classes), shards in index order
        label, instance = i % CLASSES, i // CLASSES
        assert s["__key__"] == f"{label:06d}_{instance:07d}" and int(s["cls"]) == label
        params = json.loads(s["json"])
        assert (params["label"], params["instance"]) == (label, instance)
        assert params["theta"] == gen.params(label, instance)["theta"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), gen.render(label, instance))  # lossless
    first = list(wds.WebDataset(str(dataset / "shard-000000.tar"), shardshuffle=False))
    assert {int(s["cls"]) for s in first} == set(range(CLASSES))  # every shard mixes the classes
    info = json.loads((dataset / sh.DATASET_FILE).read_text())
    assert info["generator"] == "gratings" and info["classes"] == CLASSES and info["instances"] == INSTANCES
    assert info["seed"] == 3 and info["image_size"] == SIZE and info["format"] == "png" and info["shard_size"] == SHARD
    assert info["num_shards"] == 5 and info["num_samples"] == 70 and info["shards"] == "shard-{000000..000004}.tar"
    assert info["generator_kwargs"] == {} and info["vitscale_version"]
    assert not (dataset / sh.PENDING_FILE).exists() and spec.description() == info
    assert not [p for p in dataset.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".partial")]


def test_same_arguments_give_identical_bytes_and_workers_do_not_matter(dataset, tmp_path):
    assert _shard_bytes(_write(tmp_path / "again")) == _shard_bytes(dataset)
    assert _shard_bytes(_write(tmp_path / "workers", workers=2)) == _shard_bytes(dataset)
    assert _shard_bytes(_write(tmp_path / "seed", _spec(seed=4)))["shard-000000.tar"] != \
        _shard_bytes(dataset)["shard-000000.tar"]


def test_ranks_write_disjoint_shards_that_add_up_to_the_single_rank_dataset(dataset, tmp_path):
    spec = _spec()
    claims = [sh.claim_shards(spec, tmp_path, r, 3) for r in range(3)]
    assert sorted(sum(claims, [])) == list(range(5)) and claims[1] == [1, 4]
    out = tmp_path / "ranks"
    _write(out, rank=0, world=2)
    assert not (out / sh.DATASET_FILE).exists() and (out / sh.PENDING_FILE).exists()  # rank 1 still missing
    assert sorted(_shard_bytes(out)) == ["shard-000000.tar", "shard-000002.tar", "shard-000004.tar"]
    _write(out, rank=1, world=2)  # the last rank to finish publishes dataset.json
    assert _shard_bytes(out) == _shard_bytes(dataset)
    assert (out / sh.DATASET_FILE).read_text() == (dataset / sh.DATASET_FILE).read_text()
    assert not (out / sh.PENDING_FILE).exists()


def test_interrupted_run_resumes_without_duplicates_or_truncated_shards(dataset, tmp_path):
    out = _write(tmp_path / "ds")
    kept = (out / "shard-000001.tar").stat().st_mtime_ns
    # What a run killed while writing shard 2 leaves: a partial file, no shard 2, no dataset.json.
    (out / "shard-000002.tar").unlink()
    (out / "shard-000002.tar.partial").write_bytes(b"\0" * 700)
    (out / sh.DATASET_FILE).rename(out / sh.PENDING_FILE)
    assert sh.claim_shards(_spec(), out) == [2] and not (out / "shard-000002.tar.partial").exists()
    _write(out)
    assert _shard_bytes(out) == _shard_bytes(dataset)
    assert (out / "shard-000001.tar").stat().st_mtime_ns == kept  # complete shards are not rewritten
    assert (out / sh.DATASET_FILE).exists() and not (out / sh.PENDING_FILE).exists()


def test_a_folder_with_other_arguments_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"other arguments \(instances: 7 there, 8 now\); use a new --out"):
        sh.prepare_out_dir(_spec(instances=8), dataset)
    with pytest.raises(ValueError, match="generator_kwargs"):
        sh.prepare_out_dir(_spec(generator_kwargs={"noise": 0.1}), dataset)
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="shard files but no dataset.json"):
        sh.prepare_out_dir(_spec(), tmp_path)


def test_jpeg_and_png_encoding():
    img = np.random.default_rng(0).integers(0, 256, size=(13, 21, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sh.encode_png(img)))), img)
    jpg = Image.open(io.BytesIO(sh.encode_image(img, "jpg")))
    assert jpg.format == "JPEG" and jpg.size == (21, 13)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        sh.encode_image(img.astype(np.float32), "png")


def test_the_first_published_category_list_wins(tmp_path):
    assert sh.publish_categories(tmp_path, [{"a": 1}], generator="x") == [{"a": 1}]
    assert sh.publish_categories(tmp_path, [{"a": 2}], generator="x") == [{"a": 1}]
    assert sh.load_categories(tmp_path / sh.CATEGORIES_FILE, "x", 1) == [{"a": 1}]
    with pytest.raises(ValueError, match="holds 1 categories but --classes is 2"):
        sh.load_categories(tmp_path / sh.CATEGORIES_FILE, "x", 2)
    with pytest.raises(ValueError, match="searched for generator 'x', not 'y'"):
        sh.load_categories(tmp_path / sh.CATEGORIES_FILE, "y", 1)


# -- loader -----------------------------------------------------------------------------------------

def _images(loader, batches: int):
    it = iter(loader)
    return [next(it) for _ in range(batches)]


def test_shard_loader_yields_uint8_batches_with_the_labels_of_the_images(dataset):
    gen = create_generator("gratings", CLASSES, SIZE, seed=3)
    by_image = {}
    for i in range(CLASSES * INSTANCES):
        by_image[hashlib.sha1(gen.render(i % CLASSES, i // CLASSES).tobytes()).hexdigest()] = i % CLASSES
    loader = build_shard_loader(dataset, SIZE, seed=0, micro_batch=5, global_batch=5, data_rank=0, data_world=1,
                                num_workers=0, shuffle_buffer=20, augment=False)
    for x, y in _images(loader, 20):  # 100 samples: past the end of the first epoch
        assert x.dtype == torch.uint8 and x.shape == (5, 3, SIZE, SIZE) and y.dtype == torch.long and y.shape == (5,)
        for img, label in zip(x, y):
            assert by_image[hashlib.sha1(img.permute(1, 2, 0).numpy().tobytes()).hexdigest()] == label


def test_data_ranks_read_disjoint_shards(dataset):
    per_rank = []
    for rank in range(2):
        stream = ShardStream(sorted(map(str, dataset.glob(sh.SHARD_GLOB))), SIZE, 1, 0, rank, 2)
        per_rank.append([stream.shard_order(0, w, 2) for w in range(2)])
        assert stream.shard_order(1) != stream.shard_order(0) or len(stream.shard_order(0)) < 2
    epoch0 = [u for rank in per_rank for worker in rank for u in worker]
    assert sorted(epoch0) == sorted(map(str, dataset.glob(sh.SHARD_GLOB)))  # each shard read exactly once
    # End to end: in one pass the ranks' images are disjoint and together the whole dataset.
    seen = []
    for rank in range(2):
        loader = build_shard_loader(dataset, SIZE, seed=0, micro_batch=1, global_batch=2, data_rank=rank,
                                    data_world=2, num_workers=0, shuffle_buffer=1, augment=False)
        n = sum(len(sh.DatasetSpec("gratings", CLASSES, INSTANCES, 3, SIZE, shard_size=SHARD).shard_indices(
            int(Path(u).stem.split("-")[1]))) for worker in per_rank[rank] for u in worker)
        seen.append({x.numpy().tobytes() for x, _ in _images(loader, n)})
    assert not seen[0] & seen[1] and len(seen[0]) + len(seen[1]) == CLASSES * INSTANCES


def test_augmentation_and_workers(dataset):
    loader = build_shard_loader(str(dataset / "shard-{000000..000004}.tar"), 24, seed=1, micro_batch=4,
                                global_batch=8, data_rank=1, data_world=2, num_workers=2, shuffle_buffer=8)
    for x, y in _images(loader, 6):
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.uint8 and ((y >= 0) & (y < CLASSES)).all()
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(40, 30, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30


def test_shard_loader_errors(dataset, tmp_path):
    kw = dict(image_size=SIZE, seed=0, micro_batch=2, global_batch=4, data_rank=0, data_world=2)
    with pytest.raises(ValueError, match="matches no shard"):
        build_shard_loader(str(tmp_path / "none-*.tar"), **kw)
    with pytest.raises(ValueError, match="shard .*shard-000005.tar does not exist"):
        build_shard_loader(str(dataset / "shard-{000004..000005}.tar"), **kw)
    with pytest.raises(ValueError, match=r"5 shard\(s\) cannot be split over 2 data rank\(s\) x 3 loader"):
        build_shard_loader(dataset, **kw, num_workers=3)
    with pytest.raises(ValueError, match="data.num_classes=100 but the shards hold 10 classes"):
        build_shard_loader(dataset, **kw, num_classes=100)
    (tmp_path / sh.PENDING_FILE).write_text("{}")
    with pytest.raises(ValueError, match="no dataset.json .*has not finished"):
        build_shard_loader(tmp_path, **kw)
    with pytest.raises(ValueError, match=r"has label [5-9], outside data.num_classes=5"):
        stream = ShardStream([str(dataset / "shard-000000.tar")], SIZE, 16, 0, 0, 1, num_classes=5)
        next(iter(stream))
    empty = tmp_path / "empty.tar"
    with open(empty, "wb") as f, __import__("tarfile").open(fileobj=f, mode="w"):
        pass
    with pytest.raises(ValueError, match="hold no samples"):
        next(iter(ShardStream([str(empty)], SIZE, 2, 0, 0, 1)))


def test_train_loader_picks_the_path_from_the_data_config(dataset):
    cfg = DataConfig(source="gratings", shards=None, image_size=SIZE, num_classes=CLASSES, instances=INSTANCES,
                     num_workers=0, prefetch=2, shuffle_buffer=10, augment=True, crop_scale=[0.5, 1.0],
                     crop_ratio=[0.75, 1.3333], hflip=0.5)
    on_the_fly = build_train_loader(cfg, seed=3, micro_batch=2, global_batch=2, data_rank=0, data_world=1)
    assert not isinstance(on_the_fly.dataset, ShardStream)
    for shards in (dict(shards=str(dataset)), dict(source=str(dataset))):
        loader = build_train_loader(dataclasses.replace(cfg, **shards), seed=3, micro_batch=2,
                                    global_batch=2, data_rank=0, data_world=1)
        assert isinstance(loader.dataset, ShardStream)
        x, y = next(iter(loader))
        assert x.shape == (2, 3, SIZE, SIZE) and y.dtype == torch.long


def test_npy_shards_give_the_png_shards_batches_and_load_no_pickles(dataset, tmp_path):
    """--format npy: the arrays as they are, so the loader yields the PNG shards' batches exactly,
    with augmentation (the crop box drawn from the .npy header) and without; an object array
    (a pickle) is refused."""
    npy = _write(tmp_path / "npy", _spec(format="npy"))
    sample = next(iter(wds.WebDataset(str(npy / "shard-000000.tar"), shardshuffle=False)))
    assert "npy" in sample and "png" not in sample and sh.image_size(sample["npy"], "npy") == (SIZE, SIZE)
    for augment, size in ((False, SIZE), (True, 24)):
        kw = dict(seed=5, micro_batch=4, global_batch=4, data_rank=0, data_world=1, num_workers=0,
                  shuffle_buffer=8, augment=augment)
        got = _images(build_shard_loader(npy, size, **kw), 8)
        want = _images(build_shard_loader(dataset, size, **kw), 8)
        for (x, y), (x2, y2) in zip(got, want):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        sh.decode_image(buf.getvalue(), "npy")
