"""CapPa (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"): a CLIP size's
image tower and a text decoder that reads the tower's tokens through cross-attention.

    images ──visual (CLIP's VisionTower; ln_post and proj on every token)──▶ memory (B, 1 + N, W)
    tokens ──embedding, or [MASK] everywhere (parallel)──▶ decoder blocks ──▶ ln_final, head ──▶ logits (B, L, V)

The image tower is ``clip.VisionTower`` itself, so its parameters keep the CLIP's names
(``visual.conv1``, ``visual.blocks.N...``, ``visual.ln_post``, ``visual.proj``) and it exports to timm
as a CLIP image tower does (``interop.visual_to_timm``). Its ``proj`` maps every output token (not
only the class token) to the decoder's width, the memory the decoder attends to.

A decoder block is pre-norm: causal self-attention (``vit.Attention``: ``attn.qkv`` / ``attn.proj``),
cross-attention (``cross_attn.q`` from the caption tokens, ``cross_attn.kv`` from the image tokens,
``cross_attn.proj``), MLP (``vit.Mlp``: ``mlp.fc1`` / ``mlp.fc2``), with norms ``norm1``,
``norm_cross``, ``norm2``. The names are the ones ``tensor_parallel.parallelize_vit`` shards (its
cross-attention split is the self-attention's: q and kv by heads, proj by rows).

``forward(images, tokens, parallel)`` returns next-token logits at every position: position t
predicts token t + 1. ``parallel`` (B,) bool picks, per sample, parallel prediction: every input
token replaced by the learned ``decoder.mask_embedding`` and no causal mask, so all tokens are
predicted at once from the image alone. Samples with ``parallel`` False (or ``parallel=None``)
are ordinary autoregressive captioning (causal self-attention, teacher forcing). Which samples
take which branch, and the losses, are training's business (``train/captioning.py``).

Plain single-device torch: parallelism is applied to a built model elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitscale.models.clip import (CLIP_SIZES, CLIPConfig, CLIPVisionConfig, VisionTower, clip_config,
                                  clip_initial_value, run_blocks)
from vitscale.models.noise import KeyedDropout, assign_noise_sites
from vitscale.models.registry import register_model
from vitscale.models.vit import Attention, HeadSlice, Mlp, init_by_name

__all__ = ["TextDecoderConfig", "CapPaConfig", "CapPa", "TextDecoder", "DecoderBlock", "CrossAttention",
           "cappa_config", "build_cappa", "cappa_init_weights", "cappa_layers", "CAPPA_NAMES"]


@dataclass
class TextDecoderConfig:
    """The text decoder; vocabulary and caption length are the tokenizer's (the CLIP text tower's)."""

    layers: int = 2  # decoder blocks
    width: int = 64  # token width
    heads: int = 4  # heads of the self- and the cross-attention
    mlp_ratio: float = 4.0  # MLP hidden width = int(width * mlp_ratio)
    vocab_size: int = 1000  # output classes and input token ids (the tokenizer's vocabulary)
    context_length: int = 16  # tokens per caption, start and end of text included

    def __post_init__(self):
        for name in ("layers", "width", "heads", "vocab_size", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CapPa option decoder.{name}={value!r} must be a positive integer")
        if self.width % self.heads:
            raise ValueError(f"CapPa option decoder.width={self.width} must be divisible by "
                             f"decoder.heads={self.heads}")
        if self.mlp_ratio <= 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"CapPa option decoder.mlp_ratio={self.mlp_ratio} must give an MLP width >= 1")

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class CapPaConfig:
    """The image tower (a CLIP's ``vision`` config) and the decoder; the model keeps it as ``.cfg``."""

    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    decoder: TextDecoderConfig = field(default_factory=TextDecoderConfig)
    quick_gelu: bool = False  # QuickGELU in the image tower's blocks (as the CLIP size's)

    @property
    def text(self) -> TextDecoderConfig:
        """What a tokenizer needs (vocab_size, context_length), where a CLIP has its text tower."""
        return self.decoder


class CrossAttention(nn.Module):
    """Multi-head attention of the caption tokens (queries) to the image tokens (keys, values).

    As ``vit.Attention``, ``forward`` reads the head count from ``self.num_heads`` so a tensor-parallel
    shard can hold some heads of ``q`` / ``kv`` / ``proj``. ``kv``'s rows are (k heads, v heads), each
    heads x head_dim; ``q_norm`` / ``k_norm`` are identities (named so ``parallelize_vit`` finds them).
    """

    def __init__(self, dim: int, num_heads: int, drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.heads = HeadSlice(0, num_heads)
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = KeyedDropout(drop)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Caption tokens (B, L, D), image tokens (B, M, D) -> (B, L, D)."""
        B, L, _ = x.shape
        M = memory.shape[1]
        q = self.q(x).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, hd)
        kv = self.kv(memory).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, M, hd)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, -1)), noise)


class DecoderBlock(nn.Module):
    """Pre-norm: x + attn(norm1(x)) (causal, or full for parallel prediction), x + cross_attn(norm_cross(x),
    image tokens), x + mlp(norm2(x)). LayerNorm eps 1e-5 as the CLIP towers'."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width, eps=1e-5)
        self.cross_attn = CrossAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = Mlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D), image tokens (B, M, D), self-attention mask (B, 1, L, L) bool (True = may attend)."""
        x = x + self.attn(self.norm1(x), attn_mask)
        x = x + self.cross_attn(self.norm_cross(x), memory)
        return x + self.mlp(self.norm2(x))


class _DecoderStep(nn.Module):
    """One block as a function of the tokens alone (what activation checkpointing's chunks take)."""

    def __init__(self, block: DecoderBlock, memory: torch.Tensor, attn_mask: torch.Tensor):
        super().__init__()
        self.block, self.memory, self.attn_mask = block, memory, attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.memory, self.attn_mask)


class TextDecoder(nn.Module):
    """Token ids (B, L) and image tokens (B, M, D) -> logits (B, L, vocab_size)."""

    def __init__(self, cfg: TextDecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.width))  # the [MASK] input of parallel prediction
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList([DecoderBlock(cfg.width, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.layers)])
        self.ln_final = nn.LayerNorm(cfg.width, eps=1e-5)
        self.head = nn.Linear(cfg.width, cfg.vocab_size)
        self.grad_checkpointing = 0

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, parallel: torch.Tensor | None = None) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.cfg.context_length:
            raise ValueError(f"captions of {L} tokens exceed the decoder's context_length={self.cfg.context_length}")
        x = self.token_embedding(tokens)  # (B, L, D)
        causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
        if parallel is None:
            attn_mask = causal.expand(B, 1, L, L)
        else:
            parallel = parallel.to(tokens.device, torch.bool)
            # torch.where keeps mask_embedding in the graph even when no sample takes it: its gradient
            # is then zero, never missing (ZeRO's reducers expect every parameter's gradient).
            x = torch.where(parallel[:, None, None], self.mask_embedding.to(x.dtype), x)
            attn_mask = causal | parallel[:, None, None, None]  # (B, 1, L, L): parallel rows see every position
        x = x + self.positional_embedding[:L].to(x.dtype)
        every = self.grad_checkpointing if self.training and torch.is_grad_enabled() else 0
        steps = [_DecoderStep(block, memory, attn_mask) for block in self.blocks]
        x = run_blocks(nn.Sequential(*steps), x, every, self.training)
        return self.head(self.ln_final(x))


class CapPa(nn.Module):
    """Image captioner: ``visual`` (a CLIP image tower) and ``decoder``.

    Args:
        cfg: the architecture; kept as ``self.cfg`` (read by ``models/flops.py``).
    """

    def __init__(self, cfg: CapPaConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.decoder.width, cfg.quick_gelu)
        self.decoder = TextDecoder(cfg.decoder)
        assign_noise_sites(self)
        if not self.decoder.mask_embedding.is_meta:
            cappa_init_weights(self, cfg, int(torch.randint(0, 2**62, (), device="cpu").item()))

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute activations in backward in chunks of ``every`` blocks (0 turns it off), tower and decoder."""
        self.visual.grad_checkpointing = self.decoder.grad_checkpointing = every

    def no_weight_decay(self) -> set[str]:
        """Embeddings exempt from weight decay (as a CLIP's), the [MASK] embedding with them."""
        return {"visual.class_embedding", "visual.positional_embedding", "decoder.positional_embedding",
                "decoder.mask_embedding"}

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the decoder's memory (B, 1 + N, decoder width): every output token of the
        tower, ``ln_post``, ``proj``."""
        v = self.visual
        x = run_blocks(v.blocks, v.embed(images), v.grad_checkpointing, self.training)
        return v.ln_post(x) @ v.proj

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images -> pooled embeddings (B, decoder width): the class token (linear probes, as a CLIP's)."""
        x = self.visual(images)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, parallel: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W), caption token ids (B, L), which samples predict in parallel (B,) bool (None:
        none) -> logits (B, L, vocab_size), position t predicting token t + 1. ``noise`` is accepted as every
        model here accepts it; nothing draws from it (no stochastic layers)."""
        return self.decoder(tokens, self.image_tokens(images), parallel)


def cappa_layers(model: CapPa) -> list[tuple[str, nn.Module]]:
    """The CapPa as ``(name prefix in the whole model, layer)`` pairs in forward order, as a pipeline would
    cut it: the embeddings (the tower's patches, class token, positions, ``ln_pre``; the decoder's token,
    [MASK] and position embeddings), each image block, each decoder block, the head (``ln_post``, ``proj``,
    ``ln_final``, the vocabulary head). No pipeline runs a CapPa yet; the planner counts parameters and
    FLOPs per layer with these. The layers share their parameters with ``model`` (build it on meta)."""
    v, d = model.visual, model.decoder
    embed, head = nn.Module(), nn.Module()
    for name in ("conv1", "class_embedding", "positional_embedding", "patch_norm_pre", "patch_norm", "ln_pre"):
        setattr(embed, name, getattr(v, name))
    embed.token_embedding, embed.mask_embedding = d.token_embedding, d.mask_embedding
    embed.decoder_positional_embedding = d.positional_embedding
    head.ln_post, head.proj, head.ln_final, head.head = v.ln_post, v.proj, d.ln_final, d.head
    return ([("", embed)] + [(f"visual.blocks.{i}", b) for i, b in enumerate(v.blocks)]
            + [(f"decoder.blocks.{i}", b) for i, b in enumerate(d.blocks)] + [("", head)])


def _initial_value(name: str, module: nn.Module, shape: tuple[int, ...], gen: torch.Generator,
                   cfg: CapPaConfig) -> torch.Tensor:
    if name.startswith("visual."):  # the CLIP image tower's own init (open_clip's stds)
        return clip_initial_value(name, module, shape, gen, CLIPConfig(embed_dim=cfg.decoder.width, vision=cfg.vision))
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    out, width = torch.empty(shape), cfg.decoder.width
    # The text-tower rule of open_clip for the decoder's blocks: residual outputs shrink with depth.
    if ".blocks." in name and leaf == "weight":
        proj_std = width**-0.5 * (2 * cfg.decoder.layers)**-0.5
        std = {"qkv": width**-0.5, "q": width**-0.5, "kv": width**-0.5, "fc1": (2 * width)**-0.5,
               "proj": proj_std, "fc2": proj_std}.get(name.rsplit(".", 2)[-2])
        if std is not None:
            return nn.init.normal_(out, std=std, generator=gen)
    elif name in ("decoder.token_embedding.weight", "decoder.mask_embedding"):
        return nn.init.normal_(out, std=0.02, generator=gen)
    elif name == "decoder.positional_embedding":
        return nn.init.normal_(out, std=0.01, generator=gen)
    elif name == "decoder.head.weight":
        return nn.init.normal_(out, std=width**-0.5, generator=gen)
    raise ValueError(f"cappa_init_weights: no rule for parameter {name!r} of {type(module).__name__}")


def cappa_init_weights(module: nn.Module, cfg: CapPaConfig, seed: int, prefix: str = "") -> nn.Module:
    """Initialise a CapPa (or a piece or tensor shard of it, named ``prefix`` in the whole model), each
    parameter from its own stream keyed by (seed, full name), as ``clip.clip_init_weights``: the image
    tower as a CLIP's, the decoder with open_clip's text-tower stds (token and [MASK] embeddings .02,
    positions .01, qkv / q / kv width^-1/2, fc1 (2 width)^-1/2, proj and fc2 width^-1/2 (2 layers)^-1/2,
    the vocabulary head width^-1/2), zero biases, unit LayerNorms. Meta parameters are skipped."""
    return init_by_name(module, seed, prefix, lambda name, mod, shape, gen: _initial_value(name, mod, shape, gen, cfg))


# ---- sizes: one CapPa per CLIP size (its image tower; the decoder from model.decoder) ----

CAPPA_NAMES = {name: "cappa_" + name.removeprefix("clip_") for name in CLIP_SIZES}  # clip_tiny -> cappa_tiny


def cappa_config(clip_name: str, /, vision: dict | None = None, text: dict | None = None,
                 decoder: dict | None = None, quick_gelu: bool | None = None) -> CapPaConfig:
    """The CapPa of a CLIP size: its image tower (``vision`` overrides its fields), its tokenizer's
    vocabulary and caption length (``text``: vocab_size, context_length; the rest of the text tower is
    not built), and a decoder (``decoder``: layers, width, heads, mlp_ratio).

    Raises:
        ValueError: for an unknown size or option.
    """
    clip = clip_config(clip_name, vision=vision or {}, text=text or {},
                       **({} if quick_gelu is None else {"quick_gelu": quick_gelu}))
    dec = dict(decoder or {})
    unknown = sorted(set(dec) - {"layers", "width", "heads", "mlp_ratio"})
    if unknown:
        raise ValueError(f"unknown CapPa decoder option(s) {unknown}; use layers, width, heads, mlp_ratio")
    return CapPaConfig(vision=clip.vision, quick_gelu=clip.quick_gelu,
                       decoder=TextDecoderConfig(vocab_size=clip.text.vocab_size,
                                                 context_length=clip.text.context_length, **dec))


def build_cappa(clip_name: str, /, **overrides) -> CapPa:
    """A CapPa on a CLIP size's image tower, initialised from torch's current RNG (see ``cappa_config``)."""
    return CapPa(cappa_config(clip_name, **overrides))


def _make_builder(clip_name: str, name: str):
    def builder(**overrides) -> CapPa:
        return build_cappa(clip_name, **overrides)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"CapPa on the image tower of {clip_name} with a text decoder (``overrides`` as "
                       f"``cappa_config``).")
    return builder


for _clip, _name in CAPPA_NAMES.items():
    register_model(_name, kind="cappa")(_make_builder(_clip, _name))
