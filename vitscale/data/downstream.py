"""Downstream (fine-tuning) classification data -> uint8 (image, label) micro-batches.

Three sources, named by ``data.source`` (training) and ``data.test`` (the test split):

- ``digits``: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes; shipped
  inside scikit-learn, nothing is downloaded), upscaled to ``data.image_size`` with bicubic
  interpolation, split once into 1,437 train / 360 test images (stratified, fixed seed), so
  every machine fine-tunes and tests on the same images.
- an image folder: one sub-folder per class (``torchvision.datasets.ImageFolder``); the
  test split is a second folder with the same class sub-folders.
- labelled WebDataset shards: ``{key}.png|jpg`` + ``{key}.cls`` (as ``vitscale-synth``
  writes), a folder of tars or a brace pattern.

Images go through timm's own transforms (``timm.data.create_transform``: random resized
crop, flip, RandAugment for training; resize + centre crop for testing) with
``use_prefetcher=True``, so they leave the workers as uint8 (3, H, W) like every other
loader here; normalisation, random erasing and Mixup/CutMix run on the device on the
whole batch (``vitscale.train.finetune.BatchAugment``), as timm's ``PrefetchLoader`` does.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vitscale.data.shards import IMAGE_EXTS, decode_image, resolve_shards
from vitscale.data.synthetic_loader import StepSampler, collate_labelled
from vitscale.data.tars import shard_share

DIGITS = "digits"
DIGITS_TEST = 360  # images in the fixed test split (20 %)
_DIGITS_SPLIT_SEED = 0


def is_image_folder(path: str) -> bool:
    """A folder with one sub-folder per class (and no shards)."""
    p = Path(path)
    return p.is_dir() and not any(p.glob("*.tar")) and any(c.is_dir() for c in p.iterdir())


def is_downstream_source(source: str) -> bool:
    """Whether ``data.source`` is downstream data read by this module rather than synthetic
    rendering or shards: ``digits`` or an image folder."""
    return source == DIGITS or is_image_folder(source)


class Digits(Dataset):
    """scikit-learn's handwritten digits, upscaled to ``image_size`` RGB, one fixed split.

    Args:
        split: ``train`` (1,437 images) or ``test`` (360).
        image_size: side of the upscaled images, pixels.
        transform: PIL image -> uint8 tensor (timm's transform), or None for the PIL image.
    """

    def __init__(self, split: str, image_size: int, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "test"):
            raise ValueError(f"digits split {split!r} must be 'train' or 'test'")
        digits = load_digits()
        train, test = train_test_split(np.arange(len(digits.target)), test_size=DIGITS_TEST,
                                       random_state=_DIGITS_SPLIT_SEED, stratify=digits.target)
        self.indices = train if split == "train" else test
        # 0..16 ink levels -> 0..255, white digit on black as scikit-learn stores it
        self.images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target.astype(np.int64)
        self.image_size, self.transform = image_size, transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        j = int(self.indices[i])
        img = Image.fromarray(self.images[j], mode="L").convert("RGB")
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return (self.transform(img) if self.transform else img), int(self.targets[j])


def _image_folder(path: str, transform):
    from torchvision.datasets import ImageFolder

    return ImageFolder(path, transform=transform)


class LabelledShards(IterableDataset):
    """(image, label) samples of labelled WebDataset shards through ``transform``.

    Training (``endless``): shards drawn with replacement, seeded per (seed, data rank,
    worker), a shuffle buffer, forever. Testing: every sample once, data rank ``r`` of ``D``
    taking every ``D``-th sample in shard order.
    """

    def __init__(self, urls: list[str], transform, endless: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000):
        self.urls, self.transform, self.endless = urls, transform, endless
        self.seed, self.rank, self.world, self.shuffle_buffer = seed, rank, world, shuffle_buffer

    def _decode(self, sample: dict) -> tuple[Any, int]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} needs an image "
                             "(.png/.jpg/.npy) and a .cls label for fine-tuning")
        img = decode_image(sample[ext], ext)
        return self.transform(img), int(sample["cls"])

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.endless:  # this rank's and worker's share, only its bytes read (tars.shard_share)
            for sample in shard_share(self.urls, self.rank * workers + worker, self.world * workers):
                yield self._decode(sample)
            return
        rng = random.Random(hash((self.seed, self.rank, worker)))
        urls = ({"url": rng.choice(self.urls)} for _ in iter(int, 1))
        samples = wds.tarfile_to_samples()(urls)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            yield self._decode(sample)


def timm_transform(image_size: int, train: bool, data_cfg: Any = None):
    """timm's train (random resized crop, flip, RandAugment ``data.rand_augment``) or test
    (resize, centre crop) transform, ending in a uint8 (3, H, W) tensor."""
    from timm.data import create_transform

    if not train:
        return create_transform(image_size, is_training=False, use_prefetcher=True, interpolation="bicubic")
    d = data_cfg
    transform = create_transform(image_size, is_training=True, use_prefetcher=True, interpolation="bicubic",
                                 scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip,
                                 auto_augment=d.rand_augment, re_prob=0.0)  # erasing runs on the device batch
    _patch_posterize(transform)
    return transform


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    from timm.data.auto_augment import posterize

    return posterize(img, max(1, bits_to_keep), **kwargs)


def _patch_posterize(transform) -> None:
    """timm's Posterize ops ask for 0 bits at their strongest (DeiT's ``inc1`` spec near
    magnitude 10, or plain Posterize near 0), which Pillow 12+ rejects with "bits must be
    between or equal to 1 and 8" (older Pillow returned a black image). Keep one bit there;
    every other op is timm's as is."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize_at_least_one_bit


def downstream_dataset(source: str, image_size: int, train: bool, transform, seed: int = 0, rank: int = 0,
                       world: int = 1, shuffle_buffer: int = 1000) -> Dataset | IterableDataset:
    """The dataset ``source`` names (see the module docstring); ``train`` picks the split of
    ``digits`` and, for shards, endless resampling instead of one pass."""
    if source == DIGITS:
        return Digits("train" if train else "test", image_size, transform)
    if is_image_folder(source):
        return _image_folder(source, transform)
    urls, _ = resolve_shards(source)
    return LabelledShards(urls, transform, endless=train, seed=seed, rank=rank, world=world,
                          shuffle_buffer=shuffle_buffer)


def num_classes_of(source: str) -> int | None:
    """Classes a downstream source holds, where it says (digits, image folders)."""
    if source == DIGITS:
        return 10
    if is_image_folder(source):
        return sum(1 for c in Path(source).iterdir() if c.is_dir())
    return None


def class_names_of(source: str) -> list[str] | None:
    """Class names of a downstream source where it has them: an image folder's class sub-folders
    (in ``ImageFolder``'s label order), shards' ``classnames.txt`` (one per line) beside them;
    None otherwise (digits: the label is the name)."""
    if source == DIGITS:
        return None
    if is_image_folder(source):
        return sorted(c.name for c in Path(source).iterdir() if c.is_dir())
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    names = folder / "classnames.txt"
    return [line.strip() for line in names.read_text().splitlines() if line.strip()] if names.is_file() else None


def build_downstream_loader(data_cfg: Any, seed: int, micro_batch: int, global_batch: int, data_rank: int,
                            data_world: int, start_step: int = 0, pin_memory: bool = False) -> DataLoader:
    """An endless loader of (uint8 images (B, 3, H, W), int64 labels (B,)) training micro-batches
    of ``data.source`` through timm's train transform. Digits and image folders follow the
    exact, position-determined order of ``StepSampler`` (same samples per step in every
    layout, resumable); shards stream as ``LabelledShards``."""
    d = data_cfg
    transform = timm_transform(d.image_size, True, d)
    dataset = downstream_dataset(d.source, d.image_size, True, transform, seed, data_rank, data_world,
                                 d.shuffle_buffer)
    workers = {"num_workers": d.num_workers, "pin_memory": pin_memory, "persistent_workers": d.num_workers > 0,
               "prefetch_factor": d.prefetch if d.num_workers > 0 else None,
               # RandAugment draws from each worker's python RNG, which DataLoader seeds from this
               "generator": torch.Generator().manual_seed(seed * 1000 + data_rank + start_step * 7919)}
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=micro_batch, collate_fn=collate_labelled, **workers)
    sampler = StepSampler(len(dataset), micro_batch, global_batch, data_rank, data_world, seed, start_step)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_labelled, **workers)


def heldout_batches(source: str, image_size: int, batch_size: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the test split ``source`` (every ``world``-th sample), as (uint8
    images (B, 3, H, W), labels (B,)) through timm's test transform, one pass."""
    dataset = downstream_dataset(source, image_size, False, timm_transform(image_size, False), rank=rank,
                                 world=world)
    if isinstance(dataset, IterableDataset):
        samples = iter(dataset)
    else:
        samples = (dataset[i] for i in range(rank, len(dataset), world))
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield collate_labelled(batch)
            batch = []
    if batch:
        yield collate_labelled(batch)


def uses_downstream_loader(data_cfg: Any) -> bool:
    """Whether training reads ``data.source`` through this module: digits, an image folder,
    or labelled shards with a timm RandAugment (``data.rand_augment``) to apply."""
    return is_downstream_source(data_cfg.source) or (data_cfg.rand_augment is not None and data_cfg.source != "laion")
