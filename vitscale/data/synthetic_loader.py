"""Synthetic classification data -> uint8 (image, label) micro-batches, on the fly or from shards.

``build_train_loader(data_cfg, ...)`` picks one of two paths with the same output, an
endless stream of (uint8 images (B, 3, H, W), int64 labels (B,)) micro-batches for one
data rank:

- **On the fly** (``data.source`` = a generator name, ``data.shards`` unset): images are
  rendered in the loader workers. This path is *exact*: the order below is a pure
  function of the global sample position, so every layout and every resume sees the
  same samples in each step. Parity tests and layout comparisons use it.
- **Shards** (``data.shards`` set, or ``data.source`` a shard folder / pattern): WebDataset
  tars written by ``vitscale-synth`` are streamed, shuffled and augmented (random resized
  crop + horizontal flip, as in FDSL pre-training). What a rank sees depends on the number
  of data ranks and loader workers, as for any streaming WebDataset loader; a resume in
  the same layout is exact: each worker replays its stream up to the samples its batches
  already held (reading the tars and drawing the same shuffle / augmentation numbers, but
  decoding no image), so the cost of a resume grows with the samples consumed.

On the fly, order is a function of the *global sample position*, not of the layout: optimizer
step ``s`` consumes positions ``[s * G, (s + 1) * G)`` of one seeded stream (G = the
global batch), and data rank ``r`` of ``D`` takes micro-batch ``m`` as

    positions s*G + m*(micro*D) + r*micro + [0, micro)

So every layout (any data-parallel size, any gradient accumulation) sees the same
samples in each optimizer step, which is what makes losses comparable across layouts,
and a resumed run continues from ``step * G`` without repeating or skipping samples.

Images leave the workers as uint8 and are normalised on the device
(``vitscale.data.transforms.normalize``): a quarter of the host-to-device bytes, and
no per-sample float work on the CPU.

With ``data.render=device`` the on-the-fly path yields no images at all: the loader hands over
(labels, instances) of the same positions, and the training step renders them on its device
(``generator.render_batch``, ``vitscale.data.synthetic.device``) before the forward. A sample's
image depends only on (generator, label, instance, seed), so every layout still sees the same
images in each step.
"""
from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from vitscale.data.shards import IMAGE_EXTS, decode_image, image_size, is_shard_source, load_categories, resolve_shards
from vitscale.data.tars import tar_samples
from vitscale.data.synthetic import Generator, create_generator, list_generators


class SyntheticClassification(Dataset):
    """Index ``i`` -> image ``i // num_classes`` of class ``i % num_classes``.

    Args:
        generator: a registered generator instance.
        instances: images per class; ``len(self) = num_classes * instances``.
    """

    def __init__(self, generator: Generator, instances: int):
        self.generator, self.instances = generator, instances

    def __len__(self) -> int:
        return self.generator.num_classes * self.instances

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, instance = index % self.generator.num_classes, index // self.generator.num_classes
        img = self.generator.render(label, instance)  # (H, W, 3) uint8
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label


class SyntheticIndices(SyntheticClassification):
    """``SyntheticClassification``'s index -> (instance, label) without the image: the loader of
    ``data.render=device``, whose images the training step renders on its device."""

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index // self.generator.num_classes, index % self.generator.num_classes


def collate_indices(batch: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(instance, label) samples -> (int64 labels (B,), int64 instances (B,))."""
    return torch.tensor([b[1] for b in batch], dtype=torch.long), torch.tensor([b[0] for b in batch], dtype=torch.long)


def make_generator(source: str, num_classes: int, image_size: int, seed: int, params: dict | None = None) -> Generator:
    """Generator ``source`` with the data config's ``params``; ``categories`` may name a category
    file (``vitscale-synth search``) instead of holding the list."""
    params = dict(params or {})
    if isinstance(params.get("categories"), str):
        params["categories"] = load_categories(Path(params["categories"]), source, num_classes)
    return create_generator(source, num_classes, image_size, seed, **params)


class StepSampler(Sampler[list[int]]):
    """Infinite micro-batches of dataset indices for one data-parallel rank.

    Each epoch is a fresh permutation of the dataset, seeded by (seed, epoch), so the
    stream is the same on every rank and restartable at any position.

    Args:
        dataset_len: number of samples in one epoch.
        micro_batch: samples per micro-batch.
        global_batch: samples per optimizer step over all data ranks.
        data_rank, data_world: this rank's index among the data-parallel ranks, and their number.
        seed: shuffling seed.
        start_step: first optimizer step to yield (resume).
    """

    def __init__(self, dataset_len: int, micro_batch: int, global_batch: int, data_rank: int,
                 data_world: int, seed: int, start_step: int = 0):
        if global_batch % (micro_batch * data_world):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"x {data_world} data ranks")
        if not 0 <= data_rank < data_world:
            raise ValueError(f"data rank {data_rank} outside [0, {data_world})")
        self.n, self.micro, self.global_batch = dataset_len, micro_batch, global_batch
        self.rank, self.world, self.seed, self.start_step = data_rank, data_world, seed, start_step
        self.accum = global_batch // (micro_batch * data_world)
        self._epoch, self._perm = -1, None

    def _index(self, positions: np.ndarray) -> list[int]:
        out = []
        for pos in positions.tolist():
            epoch = pos // self.n
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).numpy()
            out.append(int(self._perm[pos % self.n]))
        return out

    def positions(self, step: int, micro: int) -> np.ndarray:
        """Global stream positions of micro-batch ``micro`` of optimizer step ``step`` on this rank."""
        first = step * self.global_batch + micro * self.micro * self.world + self.rank * self.micro
        return np.arange(first, first + self.micro)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            for micro in range(self.accum):
                yield self._index(self.positions(step, micro))
            step += 1


def collate_labelled(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 image (3, H, W), int label) samples -> (images (B, 3, H, W), int64 labels (B,))."""
    images = torch.stack([b[0] for b in batch])  # (B, 3, H, W) uint8
    return images, torch.tensor([b[1] for b in batch], dtype=torch.long)


def build_synthetic_loader(source: str, num_classes: int, image_size: int, instances: int, seed: int,
                           micro_batch: int, global_batch: int, data_rank: int, data_world: int,
                           start_step: int = 0, num_workers: int = 2, prefetch: int = 4,
                           pin_memory: bool = False, params: dict | None = None,
                           render: str = "workers") -> DataLoader:
    """An endless loader of (uint8 images (B, 3, H, W), int64 labels (B,)) micro-batches, or with
    ``render="device"`` of (int64 labels (B,), int64 instances (B,)) at the same positions.

    Args:
        source: generator name (``vitscale.data.synthetic.list_generators()``).
        params: generator keyword arguments; ``categories`` may name a category file
            (``vitscale-synth search``) instead of holding the list.
        num_classes, image_size, instances: dataset shape; an epoch is num_classes * instances.
        seed: seeds both the images and their order.
        micro_batch, global_batch, data_rank, data_world: see ``StepSampler``.
        start_step: optimizer step to start from (resume).
        num_workers, prefetch, pin_memory: as in ``torch.utils.data.DataLoader``.
        render: "workers" (images rendered here) or "device" (only labels and instances; no workers,
            since indexing is all there is to do).
    """
    generator = make_generator(source, num_classes, image_size, seed, params)
    if render == "device":
        dataset = SyntheticIndices(generator, instances)
        sampler = StepSampler(len(dataset), micro_batch, global_batch, data_rank, data_world, seed, start_step)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate_indices,
                          pin_memory=pin_memory)
    dataset = SyntheticClassification(generator, instances)
    sampler = StepSampler(len(dataset), micro_batch, global_batch, data_rank, data_world, seed, start_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_labelled,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=prefetch if num_workers > 0 else None)


# -- shards -----------------------------------------------------------------------------------------

def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering a random ``scale`` fraction of the image
    with aspect ratio (log-uniform) in ``ratio``: the Inception-style crop of DeiT / FDSL
    pre-training. Falls back to the largest central crop within ``ratio`` after 10 misses."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return ratio_clamped_box(width, height, ratio)


def ratio_clamped_box(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest central crop (left, top, right, bottom) with aspect ratio within ``ratio``:
    ``random_resized_crop_box``'s fallback."""
    aspect = width / height
    w, h = ((width, round(width / ratio[0])) if aspect < ratio[0] else
            (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ShardStream(IterableDataset):
    """Endless micro-batches from synthetic WebDataset shards for one data rank.

    Each epoch, all shards are permuted with (seed, epoch); data rank ``r`` of ``D`` takes
    every ``D``-th shard of that order starting at ``r`` (disjoint across ranks within an
    epoch), and DataLoader worker ``w`` of ``W`` every ``W``-th of those. Samples pass a
    shuffle buffer, are decoded to uint8 RGB, cropped/resized to ``image_size`` and batched
    in the worker.

    Args:
        urls: all shards (every rank passes the same list).
        image_size: output side length, pixels.
        micro_batch: samples per yielded batch.
        seed: shard order, shuffle buffer and augmentation derive from it.
        data_rank, data_world: this rank and the number of data-parallel ranks.
        skip_batches: micro-batches this rank already consumed (resume). The DataLoader takes
            batch ``k`` from worker ``k % W``, so worker ``w`` replays its stream past the
            samples of its batches among the first ``skip_batches``.
        num_classes: labels outside ``[0, num_classes)`` raise; None skips the check.
        shuffle_buffer: samples held per worker for shuffling (raw bytes, before decoding).
        augment: random resized crop (``crop_scale``, ``crop_ratio``) + flip with probability
            ``hflip``; without it, images are resized (central square crop) to ``image_size``.
    """

    def __init__(self, urls: list[str], image_size: int, micro_batch: int, seed: int, data_rank: int,
                 data_world: int, skip_batches: int = 0, num_classes: int | None = None,
                 shuffle_buffer: int = 1000, augment: bool = True, crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        if not 0 <= data_rank < data_world:
            raise ValueError(f"data rank {data_rank} outside [0, {data_world})")
        self.urls, self.image_size, self.micro_batch, self.seed = list(urls), image_size, micro_batch, seed
        self.rank, self.world, self.skip_batches = data_rank, data_world, skip_batches
        self.num_classes, self.shuffle_buffer, self.augment = num_classes, shuffle_buffer, augment
        self.crop_scale, self.crop_ratio, self.hflip = tuple(crop_scale), tuple(crop_ratio), hflip

    def shard_order(self, epoch: int, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards worker ``worker`` of ``workers`` on this rank reads in ``epoch``, in order."""
        seq = np.random.SeedSequence([self.seed, epoch, 0x5A4D])  # same permutation on every rank
        perm = np.random.default_rng(seq).permutation(len(self.urls))
        return [self.urls[i] for i in perm[self.rank::self.world][worker::workers]]

    def _urls(self, worker: int, workers: int, counter: list[int]) -> Iterator[dict]:
        for epoch in itertools.count():
            order = self.shard_order(epoch, worker, workers)
            if not order:
                raise ValueError(f"data worker {worker} of {workers} on data rank {self.rank} of {self.world} has "
                                 f"no shard: {len(self.urls)} shards cannot be split over {self.world * workers} "
                                 "readers; write more, smaller shards (vitscale-synth --shard-size) or lower "
                                 "data.num_workers")
            before = counter[0]
            for url in order:
                yield {"url": url}
            if counter[0] == before:  # never spin forever on empty shards
                raise ValueError(f"shards {order[:3]}{'...' if len(order) > 3 else ''} hold no samples")

    def _decode(self, sample: dict, rng: random.Random) -> tuple[np.ndarray, int]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no .png/.jpg/.npy image "
                             f"or no .cls label (it has {sorted(k for k in sample if not k.startswith('__'))})")
        label = int(sample["cls"])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"sample {sample['__key__']} in {sample['__url__']} has label {label}, outside "
                             f"data.num_classes={self.num_classes}")
        img = decode_image(sample[ext], ext)
        size = (self.image_size, self.image_size)
        if self.augment:
            box = random_resized_crop_box(img.width, img.height, rng, self.crop_scale, self.crop_ratio)
            out = np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=box))
            if rng.random() < self.hflip:
                out = out[:, ::-1]
        elif img.size != size:
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            out = np.asarray(img.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)))
        else:
            out = np.asarray(img)
        return out, label  # (H, W, 3) uint8

    def _replay(self, sample: dict, rng: random.Random) -> None:
        """Draw what ``_decode`` draws for ``sample``, reading only the image header."""
        if self.augment:
            ext = next(e for e in IMAGE_EXTS if e in sample)
            random_resized_crop_box(*image_size(sample[ext], ext), rng, self.crop_scale, self.crop_ratio)
            rng.random()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state = np.random.SeedSequence([self.seed, self.rank, worker, 0]).generate_state(2)
        shuffle_rng, augment_rng = random.Random(int(state[0])), random.Random(int(state[1]))
        counter = [0]

        def counted(samples):
            for sample in samples:
                counter[0] += 1
                yield sample

        samples = counted(tar_samples(self._urls(worker, workers, counter)))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=shuffle_rng)(samples)
        images, labels = None, []
        skip = len(range(worker, self.skip_batches, workers)) * self.micro_batch
        for sample in samples:
            if skip:  # resume: the same draws as the first run, no decoding
                skip -= 1
                self._replay(sample, augment_rng)
                continue
            image, label = self._decode(sample, augment_rng)
            if images is None:
                images = np.empty((self.micro_batch, 3, self.image_size, self.image_size), dtype=np.uint8)
            # HWC -> CHW per image into the batch: ~5x cheaper than torch's permute().contiguous() on uint8.
            images[len(labels)] = image.transpose(2, 0, 1)
            labels.append(label)
            if len(labels) == self.micro_batch:
                yield torch.from_numpy(images), torch.tensor(labels, dtype=torch.long)  # (B, 3, H, W), (B,)
                images, labels = None, []


def build_shard_loader(shards: str | list, image_size: int, seed: int, micro_batch: int, global_batch: int,
                       data_rank: int, data_world: int, start_step: int = 0, num_classes: int | None = None,
                       num_workers: int = 2, prefetch: int = 4, pin_memory: bool = False,
                       shuffle_buffer: int = 1000, augment: bool = True,
                       crop_scale: tuple[float, float] = (0.08, 1.0),
                       crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> DataLoader:
    """An endless loader of (uint8 images (B, 3, H, W), int64 labels (B,)) micro-batches from shards.

    Args:
        shards: dataset folder, brace / glob pattern, or list of them (``vitscale.data.shards.resolve_shards``).
        image_size: training image size, pixels.
        seed: shard order, shuffling and augmentation.
        micro_batch, global_batch, data_rank, data_world: as for the on-the-fly path.
        start_step: optimizer step to start from: the stream is replayed to that step's
            position (exact in the same layout; see the module docstring).
        num_classes: the model's classes; checked against ``dataset.json`` and every label.
        num_workers, prefetch, pin_memory: as in ``torch.utils.data.DataLoader``.
        shuffle_buffer, augment, crop_scale, crop_ratio, hflip: see ``ShardStream``.

    Raises:
        ValueError: no shard matches, too few shards for data_world x num_workers readers,
            or ``num_classes`` disagrees with ``dataset.json``.
    """
    if global_batch % (micro_batch * data_world):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                         f"x {data_world} data ranks")
    urls, infos = resolve_shards(shards)
    readers = data_world * max(1, num_workers)
    if len(urls) < readers:
        raise ValueError(f"data.shards: {len(urls)} shard(s) cannot be split over {data_world} data rank(s) x "
                         f"{max(1, num_workers)} loader worker(s) (every reader needs a shard of its own); write "
                         f"at least {readers} shards (vitscale-synth --shard-size) or lower data.num_workers")
    classes = {info["classes"] for info in infos}
    if len(classes) > 1:
        raise ValueError(f"data.shards mixes datasets with {sorted(classes)} classes; their labels would collide")
    if classes and num_classes is not None and num_classes != next(iter(classes)):
        raise ValueError(f"data.num_classes={num_classes} but the shards hold {next(iter(classes))} classes "
                         f"(dataset.json); set data.num_classes={next(iter(classes))}")
    num_classes = num_classes if num_classes is not None else (next(iter(classes)) if classes else None)
    skip_batches = start_step * (global_batch // (micro_batch * data_world))
    stream = ShardStream(urls, image_size, micro_batch, seed, data_rank, data_world, skip_batches,
                         num_classes, shuffle_buffer, augment, crop_scale, crop_ratio, hflip)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers > 0 else None)


def build_train_loader(data_cfg: Any, seed: int, micro_batch: int, global_batch: int, data_rank: int,
                       data_world: int, start_step: int = 0, pin_memory: bool = False) -> DataLoader:
    """The training loader a data config asks for: shards if ``data.shards`` is set or
    ``data.source`` is a shard folder / pattern, else on-the-fly rendering of the generator
    ``data.source``.

    Args:
        data_cfg: ``vitscale.config.DataConfig`` (source, shards, image_size, num_classes,
            instances, num_workers, prefetch, shuffle_buffer, augment, crop_scale,
            crop_ratio, hflip).
        seed: the run's seed (images on the fly, order, augmentation).
        micro_batch, global_batch, data_rank, data_world, start_step, pin_memory: see
            ``build_synthetic_loader`` / ``build_shard_loader``.
    """
    d = data_cfg
    shards = d.shards if d.shards is not None else d.source if (
        d.source not in list_generators() and is_shard_source(d.source)) else None
    if shards is None:
        return build_synthetic_loader(d.source, d.num_classes, d.image_size, d.instances, seed, micro_batch,
                                      global_batch, data_rank, data_world, start_step, d.num_workers, d.prefetch,
                                      pin_memory, d.params, d.render)
    return build_shard_loader(shards, d.image_size, seed, micro_batch, global_batch, data_rank, data_world,
                              start_step, d.num_classes, d.num_workers, d.prefetch, pin_memory,
                              d.shuffle_buffer, d.augment, tuple(d.crop_scale), tuple(d.crop_ratio), d.hflip)
