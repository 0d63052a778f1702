"""Downstream data (issue 10): the built-in digits split is fixed and disjoint, image folders
and labelled shards give uint8 batches through timm's transforms, the test split is read once."""
import io
import tarfile

import numpy as np
import torch
from PIL import Image

from vitscale.config import load_config
from vitscale.data.downstream import Digits, build_downstream_loader, class_names_of, heldout_batches
from tests.conftest import TINY


def test_digits_split_is_fixed_disjoint_and_stratified():
    train, test = Digits("train", 32), Digits("test", 32)
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train.indices) & set(test.indices)
    np.testing.assert_array_equal(Digits("test", 32).indices, test.indices)  # the same on every call
    assert np.bincount(test.targets[test.indices]).min() >= 34  # every class in the test split, ~36 each
    img, label = test[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10
    assert np.asarray(img).max() > 128  # upscaled ink, not an empty canvas


def _write_images(folder, classes=3, per_class=4, size=20):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}/{i}.png")


def _write_shard(path, n=10, classes=3):
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % classes).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_image_folder_and_labelled_shards(tmp_path):
    _write_images(tmp_path / "train")
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards" / "00000.tar")
    for source in (str(tmp_path / "train"), str(tmp_path / "shards" / "00000.tar")):
        cfg = load_config(TINY, [f"data.source={source}", "data.num_classes=3", "data.image_size=32",
                                 "data.num_workers=0", "data.rand_augment=rand-m9-mstd0.5-inc1",
                                 "train.micro_batch=4", "train.global_batch=8"])
        batches = iter(build_downstream_loader(cfg.data, 0, 4, 8, data_rank=1, data_world=2))
        for _ in range(4):  # past one epoch of the folder: endless
            images, labels = next(batches)
            assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
            assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2}
        # the test split: every sample exactly once over the ranks
        seen = [labels for rank in range(2) for _, labels in heldout_batches(source, 32, 5, rank, 2)]
        assert sum(len(x) for x in seen) == (12 if "train" in source else 10)


def test_class_names_where_the_data_has_them(tmp_path):
    """The batch preview's class names: an image folder's sub-folders in ImageFolder's order, shards'
    classnames.txt; digits and shards without one have none."""
    from torchvision.datasets import ImageFolder

    for name in ("zebra", "cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / name / "0.png")
    assert class_names_of(str(tmp_path / "folder")) == ImageFolder(str(tmp_path / "folder")).classes == \
        ["cat", "dog", "zebra"]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")
    assert class_names_of(str(tmp_path / "shards")) is None
    (tmp_path / "shards" / "classnames.txt").write_text("cat\ndog\n")
    assert class_names_of(str(tmp_path / "shards")) == ["cat", "dog"]
    assert class_names_of(str(tmp_path / "shards" / "train-{000000..000000}.tar")) == ["cat", "dog"]
    assert class_names_of("digits") is None
