"""Analytic FLOPs per sample, for TFLOP/s and MFU.

A multiply-add counts as 2 FLOPs (as ``torch.utils.flop_counter`` counts). Counted:
the patch-embedding convolution, per block the QKV projection, attention scores
(Q K^T), attention-weighted values, the output projection and both MLP layers, and the
classifier head. Not counted: norms, softmax, GELU, bias adds, residuals (a few percent
at most; the same convention as Kaplan et al. 2020 and PaLM appendix B).

Training FLOPs = 3 x forward (backward costs twice the forward); with full activation
recomputation the hardware does 4 x forward (HFU counts that, MFU does not).
"""
from __future__ import annotations

from torch import nn

from vitscale.models.vit import ViTConfig


def vit_forward_flops(cfg: ViTConfig) -> int:
    """Forward FLOPs of one image through a ViT."""
    n, d, h = cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    patch = 2 * cfg.num_patches * (cfg.in_chans * cfg.patch_size**2) * d
    attn = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d  # qkv, QK^T, AV, proj
    mlp = 2 * n * d * h * 2
    head = 2 * d * cfg.num_classes
    return patch + cfg.depth * (attn + mlp) + head


def forward_flops(model_or_cfg: nn.Module | ViTConfig) -> int:
    """Forward FLOPs per sample of a model (anything with a ``.cfg``) or of a config.

    Raises:
        TypeError: for a model family without a FLOP formula here.
    """
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if isinstance(cfg, ViTConfig):
        return vit_forward_flops(cfg)
    raise TypeError(f"no FLOP formula for {type(model_or_cfg).__name__}; add one to vitscale/models/flops.py")


def train_flops(model_or_cfg: nn.Module | ViTConfig, recompute: bool = False) -> int:
    """FLOPs per training sample: 3 x forward, or 4 x with activation recomputation."""
    return (4 if recompute else 3) * forward_flops(model_or_cfg)
