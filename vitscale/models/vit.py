"""Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter names.

``state_dict()`` keys and shapes equal those of ``timm.models.VisionTransformer`` for
the same options, so weights move between the two with ``strict=True``. Plain torch,
single device: tensor and pipeline parallelism are applied to a built model by
``models/tensor_parallel.py`` and ``models/pipeline.py``; the attribute names
``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` and ``Attention.num_heads`` are what
those functions address.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.models.registry import register_model


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (features only)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False  # LayerNorm on queries and keys per head (ViT-22B)
    init_values: float | None = None  # LayerScale init (CaiT); None = off
    class_token: bool = True
    global_pool: Literal["token", "avg"] = "token"
    drop_rate: float = 0.0  # dropout after position embedding, in MLPs and before the head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over blocks

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be divisible by patch_size={self.patch_size}; "
                             f"use e.g. img_size={self.patch_size * max(1, round(self.img_size / self.patch_size))}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={self.global_pool!r} must be 'token' or 'avg'")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without it")
        if self.depth < 1 or self.num_heads < 1 or self.embed_dim < 1:
            raise ValueError(f"depth, num_heads and embed_dim must be >= 1, got {self.depth}, "
                             f"{self.num_heads}, {self.embed_dim}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # timm's ViT epsilon


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads  # heads held by this module (a tensor-parallel shard holds fewer)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.attn_drop_rate, cfg.drop_rate)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT classifier: ``embed`` -> ``blocks`` -> ``norm`` -> ``forward_head``; the pieces are
    what a pipeline splits into stages.

    Args:
        cfg: the architecture.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_features = dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as timm
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        # timm's rule: with average pooling the final norm moves after pooling (fc_norm).
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else _layer_norm(dim)
        self.fc_norm = _layer_norm(dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default init: truncated normal (std .02) for linears and the position
        embedding, a near-zero class token, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.proj.weight  # as a linear over the flattened patch (lecun-style fan-in)
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=1.0 / math.sqrt(w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, D) with class token and position embedding."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features from ``forward_features`` (B, N, D) -> logits (B, num_classes)."""
        if self.cfg.global_pool == "avg":
            x = x[:, int(self.cfg.class_token):].mean(dim=1)  # average over patch tokens only
        else:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# One table for every size (big_vision's decode_variant): width, depth, heads.
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
VIT_PATCHES = (14, 16, 32)


def build_vit(size: str, patch_size: int, **overrides) -> VisionTransformer:
    """A ViT of a size in ``VIT_SIZES``; ``overrides`` replace any ``ViTConfig`` field."""
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViT option(s) {unknown}; valid options: {', '.join(sorted(fields))}")
    width, depth, heads = VIT_SIZES[size]
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, patch_size=patch_size)
    kwargs.update(overrides)
    return VisionTransformer(ViTConfig(**kwargs))


def _register_all() -> None:
    for size in VIT_SIZES:
        for patch in VIT_PATCHES:
            def builder(_size=size, _patch=patch, **overrides):
                return build_vit(_size, _patch, **overrides)

            builder.__doc__ = f"ViT-{size[0].upper()}/{patch}: width/depth/heads {VIT_SIZES[size]}."
            register_model(f"vit_{size}_patch{patch}")(builder)


_register_all()
