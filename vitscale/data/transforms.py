"""Device-side image transforms.

Loaders hand over uint8 batches; conversion and normalisation run on the device, where
they cost microseconds, instead of per sample in CPU workers.
"""
from __future__ import annotations

import torch


def normalize(images: torch.Tensor, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> ``dtype`` (B, C, H, W), ``(x / 255 - mean) / std``.

    Args:
        images: uint8 batch, already on its device.
        mean, std: per-channel statistics in [0, 1] units; pass tensors already on the
            device (``torch.tensor(mean, device=...)``) to skip a copy per call.
        dtype: output dtype (the model's compute dtype).
    """
    m = torch.as_tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images.float() / 255.0 - m) / s).to(dtype)
