"""NaViT sequence packing (Dehghani et al. 2023, "Patch n' Pack"): images at their own aspect
ratio and (bounded, sampled) resolution, cut into patches and packed into fixed-length
token sequences, several images per sequence.

A loader stage over any stream of ``(uint8 image (C, H, W), label)`` samples (the synthetic
loaders, LAION shards, an image folder): ``pack_sequences`` yields one packed sequence at
a time, ``batch_sequences`` stacks them into micro-batches, ``pack_batches`` does both for
a loader that yields micro-batches of images. Per sequence of ``seq_len`` tokens:

    patches   (L, C * p * p) uint8   each patch flattened as (C, p, p), as ``vit.patchify``
    coords    (L, 2)         int64   (row, column) of the patch in its image's grid
    segments  (L,)           int64   1..k: which image of the sequence; 0 = padding
    labels    (K,)           int64   label of image 1..k; -1 for unused slots (K = max_images)

The model builds the block-diagonal attention mask from ``segments``, adds factorized
(row + column) position embeddings from ``coords`` and averages each image's tokens
(``vit.VisionTransformer.forward`` with coords / segments). Pure torch: no model code.

Packing is greedy into one open sequence (NaViT packs greedily too): an image that does
not fit closes the sequence, which is padded. How many images a micro-batch holds
varies, so a packed stream is not position-exact like the on-the-fly loader (a resumed
run continues with fresh packing).
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["native_size", "resize_to", "patchify_image", "pack_sequences", "batch_sequences", "pack_batches",
           "normalize_patches"]


def native_size(height: int, width: int, patch_size: int, max_size: int, min_size: int,
                rng: random.Random | None = None) -> tuple[int, int]:
    """The (height, width) an image is resized to: aspect ratio kept, the longer side bounded
    by ``max_size`` and, with ``rng``, drawn uniformly from [min_size, max_size] (NaViT's
    resolution sampling); both sides rounded to whole patches (at least one)."""
    longest = max(height, width)
    target = min(longest, max_size) if rng is None else rng.randint(min_size, max_size)
    scale = target / longest
    return (max(patch_size, round(height * scale / patch_size) * patch_size),
            max(patch_size, round(width * scale / patch_size) * patch_size))


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, *size), antialiased bilinear (unchanged if already that size)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def patchify_image(image: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) with H, W multiples of the patch -> patches (N, C * p * p) row-major over the
    grid, each flattened as (C, p, p), and their (row, column) coords (N, 2)."""
    C, H, W = image.shape
    p = patch_size
    h, w = H // p, W // p
    patches = image.reshape(C, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, C * p * p)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return patches, torch.stack([rows.flatten(), cols.flatten()], dim=1)


def _empty(seq_len: int, patch_dim: int, max_images: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"patches": torch.zeros(seq_len, patch_dim, dtype=dtype), "coords": torch.zeros(seq_len, 2, dtype=torch.long),
            "segments": torch.zeros(seq_len, dtype=torch.long), "labels": torch.full((max_images,), -1, dtype=torch.long)}


def pack_sequences(samples: Iterable[tuple[torch.Tensor, int]], patch_size: int, seq_len: int, max_images: int,
                   max_size: int, min_size: int | None = None, token_drop: float = 0.0,
                   seed: int | None = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Pack ``(image (C, H, W), label)`` samples into sequences of ``seq_len`` tokens.

    Args:
        samples: images (uint8 or float) of any size and aspect ratio, with integer labels.
        patch_size: pixels per patch side.
        seq_len: tokens per packed sequence (L).
        max_images: image slots per sequence (K).
        max_size: the longest side an image is resized to at most (the model's ``img_size``).
        min_size: with ``seed``, the smallest longest side of the resolution sampling
            (default ``max_size``: no sampling, images only shrunk to fit).
        token_drop: fraction of each image's patches dropped at random (NaViT's token
            dropping; at least one patch stays).
        seed: seeds resolution sampling and token dropping; None = no randomness (no
            resolution sampling, and ``token_drop`` must be 0).

    Yields:
        Dicts of ``patches``, ``coords``, ``segments``, ``labels`` (see the module docstring).
    """
    if not 0.0 <= token_drop < 1.0:
        raise ValueError(f"token_drop={token_drop} must be in [0, 1)")
    largest = max(1, round((max_size // patch_size) ** 2 * (1.0 - token_drop)))  # tokens of the largest image
    if largest > seq_len:
        raise ValueError(f"seq_len={seq_len} tokens cannot hold one {max_size} px image ({largest} tokens after "
                         f"token_drop={token_drop}); raise seq_len to {largest} or lower the image size")
    rng = random.Random(seed) if seed is not None else None
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if token_drop and gen is None:
        raise ValueError("token_drop needs a seed")
    min_size = max_size if min_size is None else min_size
    current, used, images = None, 0, 0
    for image, label in samples:
        size = native_size(image.shape[-2], image.shape[-1], patch_size, max_size, min_size,
                           rng if min_size < max_size else None)
        patches, coords = patchify_image(resize_to(image, size), patch_size)
        if token_drop:
            keep = max(1, round(len(patches) * (1.0 - token_drop)))
            index = torch.randperm(len(patches), generator=gen)[:keep].sort().values
            patches, coords = patches[index], coords[index]
        n = len(patches)
        if current is not None and (used + n > seq_len or images == max_images):
            yield current
            current = None
        if current is None:
            current, used, images = _empty(seq_len, patches.shape[1], max_images, patches.dtype), 0, 0
        current["patches"][used:used + n] = patches
        current["coords"][used:used + n] = coords
        current["segments"][used:used + n] = images + 1
        current["labels"][images] = int(label)
        used, images = used + n, images + 1
    if current is not None:
        yield current


def batch_sequences(sequences: Iterable[dict[str, torch.Tensor]], micro_batch: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stack packed sequences into micro-batches (patches, coords, segments, labels), each
    with a leading batch dimension of ``micro_batch``; a last incomplete batch is dropped."""
    batch: list[dict[str, torch.Tensor]] = []
    for seq in sequences:
        batch.append(seq)
        if len(batch) == micro_batch:
            yield tuple(torch.stack([s[k] for s in batch]) for k in ("patches", "coords", "segments", "labels"))
            batch = []


def pack_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], micro_batch: int, **pack_options
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A loader of (images (B, C, H, W), labels (B,)) micro-batches -> packed micro-batches of
    ``micro_batch`` sequences; ``pack_options`` as ``pack_sequences``."""
    samples = ((image, label) for images, labels in batches for image, label in zip(images, labels.tolist()))
    return batch_sequences(pack_sequences(samples, **pack_options), micro_batch)


def normalize_patches(patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 patches (..., C * p * p) flattened as (C, p, p) -> ``dtype``, ``(x / 255 - mean) / std``
    per channel (as ``transforms.normalize`` for whole images)."""
    channels = mean.numel()
    x = patches.float().unflatten(-1, (channels, -1)) / 255.0
    x = (x - mean.float()[:, None]) / std.float()[:, None]
    return x.flatten(-2).to(dtype)
