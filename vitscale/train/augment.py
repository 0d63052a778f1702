"""DeiT's batch augmentation on the device (``data.random_erasing``, ``data.mixup``, ``data.cutmix``),
after normalisation, as timm's ``PrefetchLoader`` and train script apply it; timm's own
``RandomErasing`` and ``Mixup``."""
from __future__ import annotations

import torch


class BatchAugment:
    """timm's ``RandomErasing`` per image (``data.random_erasing``, pixel mode), then timm's ``Mixup`` /
    CutMix (``data.mixup``, ``data.cutmix``), which turns the labels into soft targets with
    ``train.label_smoothing`` folded in (the loss is then timm's ``SoftTargetCrossEntropy``)."""

    def __init__(self, cfg, device: torch.device):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        d = cfg.data
        self.erase = (RandomErasing(d.random_erasing, mode="pixel", device=str(device))
                      if d.random_erasing else None)
        self.mixup = (Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                            switch_prob=d.mixup_switch_prob, label_smoothing=cfg.train.label_smoothing,
                            num_classes=d.num_classes) if d.mixup > 0 or d.cutmix > 0 else None)

    @staticmethod
    def wanted(cfg) -> bool:
        d = cfg.data
        return bool(d.random_erasing or d.mixup > 0 or d.cutmix > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W), int labels (B,) -> augmented images, labels or soft targets (B, classes)."""
        if self.erase is not None:
            images = self.erase(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels
