"""Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter names.

``state_dict()`` keys and shapes equal those of ``timm.models.VisionTransformer`` built
with the same options, so weights move between the two with ``strict=True``. Plain
torch on one device: tensor and pipeline parallelism are applied to a built model by
``models/tensor_parallel.py`` and ``models/pipeline.py``. Those functions address the
attribute names ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` and
``Attention.num_heads``, and reuse ``embed`` / ``blocks`` / ``forward_head`` as stages,
so keep those names stable.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitscale.models.adatape import AdaptiveTapeReader, adatape_check
from vitscale.models.moe import SoftMoE
from vitscale.models.noise import KeyedDropout, assign_noise_sites, keyed_dropout, keyed_uniform
from vitscale.models.registry import register_model


@dataclass
class ViTConfig:
    """Every architecture choice of a ViT; the model keeps it as ``model.cfg``.

    Defaults are ViT-B/16 at 224 px for ImageNet-1k; the registered names set the size.
    """

    img_size: int = 224  # pixels, square input
    patch_size: int = 16  # pixels per patch side
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    embed_dim: int = 768  # width D
    depth: int = 12  # number of blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0  # MLP hidden width = int(embed_dim * mlp_ratio)
    qkv_bias: bool = True
    qk_norm: bool = False  # LayerNorm on queries and keys per head (ViT-22B, Dehghani et al. 2023)
    norm_bias: bool = True  # False: every LayerNorm without bias (ViT-22B)
    parallel_block: bool = False  # attention and MLP from one normed input, summed (ViT-22B; timm's ParallelScalingBlock)
    dual_patchnorm: bool = False  # LayerNorm before and after the patch embedding (Kumar et al. 2023)
    pos_embed: Literal["learned", "factorized"] = "learned"  # factorized: row + column tables (NaViT; any grid <= img_size)
    moe_blocks: int = 0  # the last N blocks get a Soft MoE instead of the MLP (Puigcerver et al. 2024); 0 = none
    moe_experts: int = 8  # experts per Soft MoE layer, each an MLP of width mlp_hidden
    moe_slots: int = 1  # slots per expert
    # AdaTape (Xue et al. 2023; models/adatape.py): tape tokens read per sample from a bank, appended to the sequence.
    adatape_bank: Literal["learnable", "input"] | None = None  # None = off
    adatape_bank_size: int = 64  # bank tokens (input: the image in this many finer patches)
    adatape_max_tokens: int = 8  # tape slots per sample
    adatape_threshold: float = 0.5  # a sample reads tokens by descending softmax score until they sum to this
    init_values: float | None = None  # LayerScale init (CaiT, Touvron et al. 2021); None = off
    class_token: bool = True
    global_pool: Literal["token", "avg"] = "token"
    fc_norm: bool | None = None  # norm after pooling instead of before; None = timm's rule (iff 'avg')
    drop_rate: float = 0.0  # dropout after the position embedding, attn proj, MLP layers and before the head
    attn_drop_rate: float = 0.0  # dropout on attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth of the last block; linear from 0 over the blocks

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ViT option {name}={value!r} must be a positive integer")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViT option num_classes={self.num_classes!r} must be an integer >= 0 "
                             "(0 builds no classifier head)")
        if self.img_size % self.patch_size:
            nearest = self.patch_size * max(1, round(self.img_size / self.patch_size))
            raise ValueError(f"ViT option img_size={self.img_size} must be divisible by "
                             f"patch_size={self.patch_size}; use e.g. img_size={nearest}")
        if self.embed_dim % self.num_heads:
            ok = [h for h in range(1, min(self.embed_dim, 64) + 1) if self.embed_dim % h == 0]
            raise ValueError(f"ViT option embed_dim={self.embed_dim} must be divisible by "
                             f"num_heads={self.num_heads}; use num_heads in {ok}")
        if self.mlp_ratio <= 0 or self.mlp_hidden < 1:
            raise ValueError(f"ViT option mlp_ratio={self.mlp_ratio} must give an MLP width >= 1 "
                             f"(embed_dim * mlp_ratio = {self.embed_dim * self.mlp_ratio})")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViT option {name}={value} must be in [0, 1); 0 turns it off")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"ViT option global_pool={self.global_pool!r} must be 'token' or 'avg'")
        if self.pos_embed not in ("learned", "factorized"):
            raise ValueError(f"ViT option pos_embed={self.pos_embed!r} must be 'learned' or 'factorized'")
        if not 0 <= self.moe_blocks <= self.depth:
            raise ValueError(f"ViT option moe_blocks={self.moe_blocks} must be between 0 and depth={self.depth}")
        if self.moe_blocks and (self.moe_experts < 1 or self.moe_slots < 1):
            raise ValueError(f"ViT options moe_experts={self.moe_experts} and moe_slots={self.moe_slots} must be >= 1")
        if self.moe_blocks and self.parallel_block:
            raise ValueError("ViT options moe_blocks and parallel_block cannot be combined: a parallel block fuses "
                             "the MLP into the attention's input projection; set one of them off")
        adatape_check(self.adatape_bank, self.adatape_bank_size, self.adatape_max_tokens, self.adatape_threshold,
                      self.img_size)
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViT option global_pool='token' needs class_token=True; "
                             "set class_token=True or global_pool='avg'")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        """Tokens per image: patches plus the class token."""
        return self.num_patches + int(self.class_token)

    @property
    def tape_tokens(self) -> int:
        """AdaTape's tape slots appended to every sequence (0 without AdaTape)."""
        return self.adatape_max_tokens if self.adatape_bank else 0

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def use_fc_norm(self) -> bool:
        # timm's rule: with average pooling the final norm moves after the pooling.
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm


def _layer_norm(dim: int, bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, bias=bias)  # timm's ViT epsilon, not torch's 1e-5


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): zero a residual branch for a random subset
    of samples, rescaling the kept ones so the expectation is unchanged. With ``noise`` keys
    (``models/noise.py``) each sample's draw is keyed to the sample and this layer's ``site``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.site = 0  # set by noise.assign_noise_sites

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if noise is None:
            mask = x.new_empty(shape).bernoulli_(keep)  # one draw per sample
        else:
            index = torch.zeros((), dtype=torch.int64, device=x.device)
            mask = (keyed_uniform(noise.to(x.device), self.site, index) < keep).to(x.dtype).view(shape)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, C, H, W) -> patches (B, N, C * p * p), row-major over the grid, each patch
    flattened as (C, p, p): the layout of ``PatchEmbed.proj.weight.flatten(1)``."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as a strided convolution (``proj``, timm's name).

    ``dual_norm`` (Dual PatchNorm, Kumar et al. 2023): LayerNorm over each flattened patch
    before the projection (``pre_norm``) and over each token after it (``norm``, timm's name
    for the latter). ``embed_patches`` takes already flattened patches (packed sequences)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, dual_norm: bool = False,
                 norm_bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pre_norm = _layer_norm(in_chans * patch_size**2, norm_bias) if dual_norm else None
        self.norm = _layer_norm(embed_dim, norm_bias) if dual_norm else nn.Identity()

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Flattened patches (..., C * p * p) -> tokens (..., D); the convolution as a linear map."""
        if self.pre_norm is not None:
            patches = self.pre_norm(patches)
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm is not None:  # the pre-norm needs whole patches: unfold first
            return self.embed_patches(patchify(x, self.patch_size))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, D, h, w) -> (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention.

    ``forward`` reads the head count from ``self.num_heads``, not from ``qkv``'s shape, so
    a tensor-parallel shard can hold a slice of ``qkv``/``proj`` and set its local heads.
    ``causal`` lets each token attend only to itself and earlier ones (a text tower).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, causal: bool = False, norm_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads  # heads held by this module
        self.heads = HeadSlice(0, num_heads)  # which of the model's heads they are (a tensor shard's slice)
        self.site = 0  # the attention-dropout site (noise.assign_noise_sites)
        self.causal = causal
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = _layer_norm(self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim, norm_bias) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop  # a probability: SDPA applies it, no module needed
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = KeyedDropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, D); ``attn_mask`` (B, 1, N, N) bool, True = may attend
        (the block-diagonal mask of packed sequences); ``noise``: sample keys for dropout."""
        B, N, _ = x.shape
        # qkv's output is laid out (3, heads, head_dim), as in timm, so checkpoints agree.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        dropout = AttnDropout(self.attn_drop if self.training else 0.0, noise, self.site, self.heads)
        x = attend(q, k, v, self.q_norm, self.k_norm, attn_mask, dropout, self.causal)
        return self.proj_drop(self.proj(x), noise)


@dataclass(frozen=True)
class HeadSlice:
    """The heads an attention module holds: ``[offset, offset + local)`` of ``total`` (tensor parallelism)."""

    offset: int
    total: int


@dataclass(frozen=True)
class AttnDropout:
    """Dropout of the attention probabilities: probability ``p``; with sample keys ``noise``, the masks
    are keyed to (sample, ``site``, head of the whole model, query, key) (``models/noise.py``)."""

    p: float
    noise: torch.Tensor | None = None
    site: int = 0
    heads: HeadSlice | None = None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module,
           attn_mask: torch.Tensor | None, dropout: AttnDropout, causal: bool = False) -> torch.Tensor:
    """Per-head q/k norms, then attention: q, k, v (B, heads, N, head_dim) -> (B, N, heads * head_dim).

    SDPA (flash / memory-efficient kernels, its own dropout) unless the dropout is keyed: SDPA
    takes no mask from outside, so keyed attention dropout computes softmax(q k^T) explicitly."""
    B, heads, N, head_dim = q.shape
    q, k = q_norm(q), k_norm(k)
    if dropout.p > 0 and dropout.noise is not None:
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5  # (B, heads, N, N)
        if causal:
            scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        slice_ = dropout.heads or HeadSlice(0, heads)
        probs = keyed_dropout(scores.softmax(dim=-1), dropout.p, dropout.noise, dropout.site, 0, slice_.offset,
                              slice_.total)
        x = probs @ v
    else:
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout.p, is_causal=causal)
    return x.transpose(1, 2).reshape(B, N, heads * head_dim)


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf form, as timm and the original ViT) -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = KeyedDropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = KeyedDropout(drop)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)), noise)), noise)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT); ``gamma`` is timm's name."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Args:
        cfg: the architecture (width, heads, options).
        drop_path: stochastic-depth probability of this block.
        moe: a Soft MoE layer (``models/moe.py``) in place of the MLP.
    """

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, moe: bool = False):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = _layer_norm(dim, cfg.norm_bias)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.attn_drop_rate, cfg.drop_rate,
                              norm_bias=cfg.norm_bias)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = _layer_norm(dim, cfg.norm_bias)
        if moe:
            self.mlp = SoftMoE(dim, cfg.mlp_hidden, cfg.moe_experts, cfg.moe_slots, cfg.drop_rate)
        else:
            self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, D); ``noise``: sample keys for dropout and drop-path (``models/noise.py``)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask, noise)), noise)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x), noise)), noise)


class ParallelBlock(nn.Module):
    """ViT-22B's parallel block (Dehghani et al. 2023, after GPT-J / PaLM):
    ``x + out_proj([attn(q, k, v), GELU(h)])`` where ``[h, q, k, v] = in_proj(in_norm(x))``.

    Attention and MLP read the same normed input, so their input projections are one fused
    matrix (``in_proj``: rows MLP hidden, q, k, v) and their output projections another
    (``out_proj``: columns attention, MLP hidden). Under tensor parallelism each is split
    once, so a block needs one all-reduce forward and one backward instead of two each.
    Names and layouts are timm's ``ParallelScalingBlock(fuse_out_proj=True)``: with
    ``qkv_bias=False`` the MLP keeps its bias as ``mlp_bias``.
    """

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        dim, hidden = cfg.embed_dim, cfg.mlp_hidden
        self.num_heads = cfg.num_heads  # heads held by this module (a tensor shard sets its local count)
        self.heads = HeadSlice(0, cfg.num_heads)  # which of the model's heads they are
        self.site = 0  # the attention-dropout site (noise.assign_noise_sites)
        self.head_dim = dim // cfg.num_heads
        self.in_norm = _layer_norm(dim, cfg.norm_bias)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=cfg.qkv_bias)
        self.mlp_bias = None if cfg.qkv_bias else nn.Parameter(torch.zeros(hidden))
        self.q_norm = _layer_norm(self.head_dim, cfg.norm_bias) if cfg.qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim, cfg.norm_bias) if cfg.qk_norm else nn.Identity()
        self.attn_drop = cfg.attn_drop_rate
        self.mlp_act = nn.GELU()
        self.mlp_drop = KeyedDropout(cfg.drop_rate)
        self.out_proj = nn.Linear(dim + hidden, dim)
        self.ls = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        y = self.in_proj(self.in_norm(x))  # (B, N, hidden + 3 D), local widths under tensor parallelism
        width = self.num_heads * self.head_dim
        x_mlp, q, k, v = y.split([y.shape[-1] - 3 * width, width, width, width], dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q, k, v = (t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = AttnDropout(self.attn_drop if self.training else 0.0, noise, self.site, self.heads)
        x_attn = attend(q, k, v, self.q_norm, self.k_norm, attn_mask, dropout)
        y = self.out_proj(torch.cat([x_attn, self.mlp_drop(self.mlp_act(x_mlp), noise)], dim=-1))
        return x + self.drop_path(self.ls(y), noise)


class VisionTransformer(nn.Module):
    """ViT classifier: ``embed`` -> ``blocks`` -> ``norm`` -> ``forward_head``.

    Those pieces are what a pipeline splits into stages: the first stage runs ``embed``,
    each stage a slice of ``blocks``, the last ``norm`` and ``forward_head``.

    Args:
        cfg: the architecture; kept as ``self.cfg`` (read by ``models/flops.py``).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.num_features = dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim, cfg.dual_patchnorm, cfg.norm_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        learned = cfg.pos_embed == "learned"
        # Learned: one vector per position, the class token's included.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, dim)) if learned else None
        # Factorized (NaViT): a row and a column table, summed; any grid up to img_size fits,
        # and the class token gets no position.
        self.pos_embed_h = None if learned else nn.Parameter(torch.zeros(1, cfg.grid_size, dim))
        self.pos_embed_w = None if learned else nn.Parameter(torch.zeros(1, cfg.grid_size, dim))
        self.pos_drop = KeyedDropout(cfg.drop_rate)
        # Deeper blocks are dropped more often: rate grows linearly from 0 to drop_path_rate.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        first_moe = cfg.depth - cfg.moe_blocks
        self.blocks = nn.Sequential(*[
            ParallelBlock(cfg, rate) if cfg.parallel_block else Block(cfg, rate, moe=i >= first_moe)
            for i, rate in enumerate(rates)])
        self.norm = nn.Identity() if cfg.use_fc_norm else _layer_norm(dim, cfg.norm_bias)
        self.fc_norm = _layer_norm(dim, cfg.norm_bias) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = KeyedDropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.adatape = None if cfg.adatape_bank is None else AdaptiveTapeReader(
            dim, cfg.adatape_bank, cfg.adatape_bank_size, cfg.adatape_max_tokens, cfg.adatape_threshold, cfg.img_size,
            cfg.in_chans)
        self.grad_checkpointing = 0
        assign_noise_sites(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's default init (see ``init_weights``), seeded from torch's current RNG, so
        ``torch.manual_seed(s)`` before building fixes every weight. Parameters on the meta
        device are left alone: materialise them later with ``init_weights``."""
        if not self.patch_embed.proj.weight.is_meta:
            init_weights(self, int(torch.randint(0, 2**62, (), device="cpu").item()))

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute activations in backward instead of storing them, in chunks of ``every``
        blocks (0 turns it off): memory for about one extra forward pass of the blocks."""
        self.grad_checkpointing = every

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimizers conventionally exempt from weight decay."""
        return {"pos_embed", "pos_embed_h", "pos_embed_w", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, timm's convention (read by timm's layer-wise LR decay):
        embeddings first, then each block, then the final norm; the head after them."""
        return {"stem": r"^cls_token|pos_embed|patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def embed(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, D): patches, class token, position embedding.

        Raises:
            ValueError: when H x W is not the ``img_size`` the position embedding was built for.
        """
        if x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"input images are {tuple(x.shape[-2:])} pixels but the model was built with "
                             f"img_size={self.cfg.img_size}; resize the input or build with "
                             f"img_size={x.shape[-1]}")
        x = self.patch_embed(x)
        if self.pos_embed is None:  # factorized: row + column of each patch of the full grid
            x = x + (self.pos_embed_h[:, :, None] + self.pos_embed_w[:, None, :]).flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x, noise)

    def embed_packed(self, patches: torch.Tensor, coords: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """Packed sequences (NaViT) -> tokens: flattened patches (B, L, C * p * p) at grid
        positions ``coords`` (B, L, 2) (row, column) -> (B, L, D), factorized positions added."""
        if self.pos_embed_h is None:
            raise ValueError("packed sequences need model.pos_embed=factorized (NaViT's row + column embedding)")
        x = self.patch_embed.embed_patches(patches)
        return self.pos_drop(x + self.pos_embed_h[0][coords[..., 0]] + self.pos_embed_w[0][coords[..., 1]], noise)

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> normed tokens (B, N, D); with ``attn_mask``, ``x`` are tokens
        already embedded (``embed_packed``)."""
        images, x = x, self.embed(x, noise) if attn_mask is None else x
        n = x.shape[1]
        if self.adatape is not None and attn_mask is None:  # AdaTape: the tape after the tokens, unread slots masked
            x, attn_mask = self.adatape(x, images)
        every = self.grad_checkpointing
        blocks = list(self.blocks)
        if every and self.training and torch.is_grad_enabled():
            # The masks are keyed to the inputs (noise), so the recomputation draws the same ones.
            for i in range(0, len(blocks), every):
                x = checkpoint(_run_blocks, blocks[i:i + every], x, attn_mask, noise, use_reentrant=False)
        else:
            x = _run_blocks(blocks, x, attn_mask, noise)
        return self.norm(x[:, :n])  # the tape's outputs are not pooled

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) from ``forward_features`` -> logits (B, num_classes).

        Args:
            x: tokens after the final ``norm``.
            pre_logits: return the pooled, normed features (B, D) instead of logits.

        Returns:
            Logits, or pooled features when ``pre_logits`` is set or ``num_classes`` is 0.
        """
        if self.cfg.global_pool == "avg":
            x = x[:, int(self.cfg.class_token):].mean(dim=1)  # average over patch tokens only
        else:
            x = x[:, 0]  # the class token
        x = self.head_drop(self.fc_norm(x), noise)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes); or packed sequences (NaViT):
        flattened patches ``x`` (B, L, C * p * p), ``coords`` (B, L, 2) and ``segments`` (B, L)
        (image 1, 2, ... of its sequence, 0 = padding) -> logits (B, K, num_classes) of image
        slots 1..K, K the largest segment id in the batch (one host sync).

        ``noise``: int64 (B,) sample keys; dropout and drop-path then draw masks keyed to the
        sample (``models/noise.py``) instead of torch's RNG."""
        if coords is None:
            return self.forward_head(self.forward_features(x, noise=noise), noise=noise)
        x = self.forward_features(self.embed_packed(x, coords, noise), packed_attention_mask(segments), noise)
        pooled = pool_segments(x, segments, int(segments.max()))  # (B, K, D), average over each image's tokens
        x = self.head_drop(self.fc_norm(pooled), noise)
        return x if self.cfg.num_classes == 0 else self.head(x)


def _run_blocks(blocks: list[nn.Module], x: torch.Tensor, attn_mask: torch.Tensor | None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    for block in blocks:
        x = block(x, attn_mask, noise)
    return x


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Segment ids (B, L) -> block-diagonal mask (B, 1, L, L), True where query and key belong
    to the same image. Padding (id 0) attends to padding only, so no row is empty (an empty
    row would make SDPA return NaN); padding is never pooled."""
    return (segments[:, :, None] == segments[:, None, :])[:, None]


def pool_segments(x: torch.Tensor, segments: torch.Tensor, images: int) -> torch.Tensor:
    """Average tokens (B, L, D) per image: segment ids (B, L) -> (B, images, D) for ids
    1..images; an id absent from a row gives zeros."""
    onehot = (segments[:, None, :] == torch.arange(1, images + 1, device=x.device)[None, :, None]).to(x.dtype)
    return (onehot @ x) / onehot.sum(-1, keepdim=True).clamp(min=1)


def _param_stream(seed: int, name: str) -> torch.Generator:
    """The random stream of one parameter, keyed by (seed, full parameter name)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def _initial_value(name: str, module: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if isinstance(module, LayerScale):
        return torch.full(shape, module.init_values)
    if isinstance(module, (SoftMoE, AdaptiveTapeReader)):
        return module.initial_value(leaf, shape, gen)
    if leaf in ("bias", "mlp_bias"):
        return torch.zeros(shape)
    out = torch.empty(shape)
    if name.endswith(("patch_embed.proj.weight", "adatape.bank_embed.weight")):  # a linear map of the flattened patch, LeCun-style
        return nn.init.trunc_normal_(out, std=1.0 / math.sqrt(math.prod(shape[1:])), generator=gen)
    if leaf == "cls_token":
        return nn.init.normal_(out, std=1e-6, generator=gen)
    if leaf in ("weight", "pos_embed", "pos_embed_h", "pos_embed_w"):
        return nn.init.trunc_normal_(out, std=0.02, generator=gen)
    raise ValueError(f"init_weights: no rule for parameter {name!r} of {type(module).__name__}")


def init_weights(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """timm's ViT init, each parameter from its own stream keyed by (seed, full name).

    Truncated normal (std .02) for linear weights and the position embedding, a
    near-zero class token, zero biases, unit LayerNorms, LayerScale at its init value,
    the patch embedding LeCun-style (std 1/sqrt(fan_in)).

    Because no parameter's value depends on the order of the others, any piece of a
    model initialises to exactly what it holds in the whole model: a pipeline stage
    (``prefix`` = its name in the whole model, e.g. ``"blocks.3"``) or a tensor-parallel
    shard (a module with ``full_shape(name)`` / ``shard(name, full)``: the full
    parameter is drawn, then sliced). Parameters on the meta device are skipped.

    Returns:
        ``module``.
    """
    return init_by_name(module, seed, prefix, _initial_value)


def init_by_name(module: nn.Module, seed: int, prefix: str, initial_value) -> nn.Module:
    """Give every parameter of ``module`` ``initial_value(full name, owner module, full shape,
    generator)``, the generator keyed by (seed, full name); shards keep their slice (see
    ``init_weights``). Shared by the ViT's and CLIP's inits."""
    for mod_name, mod in module.named_modules(prefix=prefix):
        for leaf, p in mod.named_parameters(recurse=False):
            if p.is_meta:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            shape = tuple(mod.full_shape(leaf)) if hasattr(mod, "full_shape") else tuple(p.shape)
            value = initial_value(name, mod, shape, _param_stream(seed, name))
            if hasattr(mod, "shard"):
                value = mod.shard(leaf, value)
            with torch.no_grad():
                p.copy_(value)
    return module


# Every size in one table (as big_vision's decode_variant): width, depth, heads.
# All use mlp_ratio 4 (MLP width 4 x D), as in Dosovitskiy et al. 2021, Table 1.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
VIT_PATCHES = (14, 16, 32)


def vit_config(size: str, patch_size: int, /, **overrides) -> ViTConfig:
    """The config of a size in ``VIT_SIZES`` without building weights.

    Args:
        size: ``tiny``, ``small``, ``base``, ``large`` or ``huge``.
        patch_size: pixels per patch side (the name's default; ``overrides`` may change it).
        overrides: any ``ViTConfig`` field, e.g. ``img_size=64, num_classes=10, depth=4``.

    Returns:
        The validated config.

    Raises:
        ValueError: for an unknown size or option, or an invalid combination.
    """
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; use one of {', '.join(VIT_SIZES)}")
    fields = sorted(f.name for f in dataclasses.fields(ViTConfig))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown ViT option(s) {unknown}; valid options: {', '.join(fields)}")
    width, depth, heads = VIT_SIZES[size]
    kwargs = dict(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=patch_size)
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def build_vit(size: str, patch_size: int, /, **overrides) -> VisionTransformer:
    """A ViT of a size in ``VIT_SIZES``, initialised from torch's current RNG.

    Args:
        size: ``tiny``, ``small``, ``base``, ``large`` or ``huge``.
        patch_size: pixels per patch side.
        overrides: any ``ViTConfig`` field.

    Returns:
        The model.
    """
    return VisionTransformer(vit_config(size, patch_size, **overrides))


def _make_builder(size: str, patch_size: int):
    def builder(**overrides) -> VisionTransformer:
        return build_vit(size, patch_size, **overrides)

    width, depth, heads = VIT_SIZES[size]
    builder.__name__ = builder.__qualname__ = f"vit_{size}_patch{patch_size}"
    builder.__doc__ = (f"ViT-{size[0].upper()}/{patch_size}: width {width}, depth {depth}, {heads} heads; "
                       "``overrides`` replace any ViTConfig field.")
    return builder


for _size in VIT_SIZES:
    for _patch in VIT_PATCHES:
        register_model(f"vit_{_size}_patch{_patch}")(_make_builder(_size, _patch))


@register_model("vit_22b_patch14")
def vit_22b_patch14(**overrides) -> VisionTransformer:
    """ViT-22B's shape (Dehghani et al. 2023): width 6144, depth 48, 48 heads, MLP 24576,
    patch 14, QK-norm, no qkv bias, bias-free LayerNorms, parallel attention/MLP blocks;
    21.7B parameters. Build it on the meta device (or sharded through
    ``train.engine.build_model``): in fp32 it takes 87 GB."""
    kwargs = dict(embed_dim=6144, depth=48, num_heads=48, qk_norm=True, qkv_bias=False, norm_bias=False,
                  parallel_block=True)
    return build_vit("huge", 14, **{**kwargs, **overrides})
