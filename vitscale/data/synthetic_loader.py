"""Synthetic classification data -> uint8 (image, label) micro-batches.

Order is a function of the *global sample position*, not of the layout: optimizer
step ``s`` consumes positions ``[s * G, (s + 1) * G)`` of one seeded stream (G = the
global batch), and data rank ``r`` of ``D`` takes micro-batch ``m`` as

    positions s*G + m*(micro*D) + r*micro + [0, micro)

So every layout (any data-parallel size, any gradient accumulation) sees the same
samples in each optimizer step, which is what makes losses comparable across layouts,
and a resumed run continues from ``step * G`` without repeating or skipping samples.

Images leave the workers as uint8 and are normalised on the device
(``vitscale.data.transforms.normalize``): a quarter of the host-to-device bytes, and
no per-sample float work on the CPU.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitscale.data.synthetic import Generator, create_generator


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


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([b[0] for b in batch])  # (B, 3, H, W) uint8
    return images, torch.tensor([b[1] for b in batch], dtype=torch.long)


def build_synthetic_loader(source: str, num_classes: int, image_size: int, instances: int, seed: int,
                           micro_batch: int, global_batch: int, data_rank: int, data_world: int,
                           start_step: int = 0, num_workers: int = 2, prefetch: int = 4,
                           pin_memory: bool = False) -> DataLoader:
    """An endless loader of (uint8 images (B, 3, H, W), int64 labels (B,)) micro-batches.

    Args:
        source: generator name (``vitscale.data.synthetic.list_generators()``).
        num_classes, image_size, instances: dataset shape; an epoch is num_classes * instances.
        seed: seeds both the images and their order.
        micro_batch, global_batch, data_rank, data_world: see ``StepSampler``.
        start_step: optimizer step to start from (resume).
        num_workers, prefetch, pin_memory: as in ``torch.utils.data.DataLoader``.
    """
    dataset = SyntheticClassification(create_generator(source, num_classes, image_size, seed), instances)
    sampler = StepSampler(len(dataset), micro_batch, global_batch, data_rank, data_world, seed, start_step)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      prefetch_factor=prefetch if num_workers > 0 else None)
