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


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box ``i`` out of image ``i`` and resize it to ``size`` x ``size``, all in one call.

    Args:
        images: uint8 or float (B, C, H, W), on the device.
        boxes: (B, 5) float: x0, y0, x1, y1 in pixels (pixel ``j`` spans [j, j + 1)), and a
            flag (> 0.5: flip horizontally), as ``vitscale.data.laion`` draws them.
        size: output side length.

    Returns:
        float32 (B, C, size, size) in the input's value range. Bilinear sampling averaged over
        ``ceil(box / size)`` points per output pixel (``torchvision.ops.roi_align``), so a
        downscale is antialiased like a box filter.
    """
    from torchvision.ops import roi_align

    boxes = boxes.to(images.device, torch.float32)
    index = torch.arange(len(boxes), device=images.device, dtype=torch.float32)[:, None]
    out = roi_align(images.float(), torch.cat([index, boxes[:, :4]], dim=1), (size, size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    flip = boxes[:, 4] > 0.5
    if flip.any():
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out
