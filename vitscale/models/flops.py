"""Analytic FLOPs per sample, for TFLOP/s and MFU.

Convention: a multiply-add counts as 2 FLOPs, as ``torch.utils.flop_counter`` counts,
so these numbers equal what ``FlopCounterMode`` reports for our models. Counted: the
matrix products, i.e. the patch-embedding convolution, per block the QKV projection,
the attention scores (Q K^T), the attention-weighted values (A V), the output
projection and both MLP layers, and the classifier head. Not counted: norms, softmax,
GELU, bias adds, residual adds, pooling (a few percent at most at ViT sizes; Kaplan et
al. 2020, section 2.1, and PaLM, Chowdhery et al. 2022, appendix B, drop them too).

Training FLOPs = 3 x forward: the backward pass costs twice the forward (a gradient
for the input and one for the weights of every matrix product). With full activation
recomputation the hardware runs the forward twice, 4 x forward; that is the hardware
FLOPs utilisation (HFU) count, while model FLOPs utilisation (MFU) keeps 3 x.

A CLIP sample is one image and one caption of ``context_length`` tokens: both towers'
matrix products as above (the text tower's causal attention counted in full, as the
unfused kernel computes it) and both projections; the B x B logits of the loss are not
a per-sample cost and are left out.

A CapPa sample (``models/cappa.py``) is one image through the tower, every output token projected
to the decoder's width, and one caption of ``context_length`` tokens through the decoder: per block
the self-attention (causal counted in full, as for the text tower), the cross-attention (q on the
caption tokens, k and v on the image tokens, scores and weighted values caption x image tokens,
proj) and the MLP, then the vocabulary head on every position. Both of its branches (autoregressive
and parallel prediction) run the same products.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from vitscale.models.adatape import adatape_flops
from vitscale.models.cappa import CapPaConfig
from vitscale.models.clip import CLIPConfig
from vitscale.models.vit import ViTConfig


def vit_forward_flops(cfg: ViTConfig) -> int:
    """Forward FLOPs of one image through a ViT.

    Args:
        cfg: the architecture.

    Returns:
        FLOPs per image (2 per multiply-add).
    """
    head = 2 * cfg.embed_dim * cfg.num_classes  # one pooled vector per image; 0 classes = no head
    return _patch_embed_flops(cfg, cfg.num_patches) + _tape_flops(cfg) + _blocks_flops(cfg, _block_tokens(cfg)) + head


def _block_tokens(cfg: ViTConfig) -> int:
    """Tokens per image in the blocks: AdaTape's tape slots counted at max_tokens, the upper bound
    (the blocks run on every slot, read or masked: a mask saves no work)."""
    return cfg.seq_len + cfg.tape_tokens


def _tape_flops(cfg: ViTConfig) -> int:
    if not cfg.adatape_bank:
        return 0
    return adatape_flops(cfg.embed_dim, cfg.adatape_bank, cfg.adatape_bank_size, cfg.adatape_max_tokens,
                         cfg.in_chans, cfg.img_size)


def packed_forward_flops(cfg: ViTConfig, seq_len: int, images: int) -> int:
    """Forward FLOPs of one packed sequence (NaViT): ``seq_len`` tokens, padding included (the
    block-diagonal mask does not make SDPA skip work), then ``images`` image slots pooled
    (a (K, L) x (L, D) product) and classified.

    Args:
        cfg: the architecture.
        seq_len: tokens per packed sequence.
        images: image slots per sequence (the pooling and the head run on every slot).
    """
    d = cfg.embed_dim
    pooling = 2 * images * seq_len * d
    return _patch_embed_flops(cfg, seq_len) + _blocks_flops(cfg, seq_len) + pooling + 2 * d * cfg.num_classes * images


def _patch_embed_flops(cfg: ViTConfig, patches: int) -> int:
    return 2 * patches * (cfg.in_chans * cfg.patch_size**2) * cfg.embed_dim  # conv = a linear per patch


def _blocks_flops(cfg: ViTConfig, n: int) -> int:
    """All blocks on n tokens. A parallel block's fused projections hold the same products
    as the sequential block's four linears; a Soft MoE block's MLP is replaced by its own count."""
    d, hidden, moe = cfg.embed_dim, cfg.mlp_hidden, cfg.moe_blocks
    dense = (cfg.depth - moe) * _block_flops(n, d, hidden)
    return dense + moe * (_attention_flops(n, d) + soft_moe_flops(n, d, hidden, cfg.moe_experts * cfg.moe_slots))


def soft_moe_flops(n: int, d: int, hidden: int, slots: int) -> int:
    """One Soft MoE layer on n tokens with ``slots`` slots in all (experts x slots per expert):
    token-slot logits, dispatch (slots = D^T X), one expert MLP per slot, combine. Fixed by the
    slot count, whatever the routing: Soft MoE has no data-dependent cost."""
    logits = 2 * n * d * slots
    dispatch = combine = 2 * slots * n * d
    experts = slots * 2 * d * hidden * 2  # fc1 and fc2 of an expert on each of its slots
    return logits + dispatch + experts + combine


def _attention_flops(n: int, d: int) -> int:
    return (2 * n * d * 3 * d  # qkv
            + 2 * n * n * d  # Q K^T, summed over heads: heads x N x N x head_dim
            + 2 * n * n * d  # A V
            + 2 * n * d * d)  # proj


def _block_flops(n: int, d: int, hidden: int) -> int:
    """One transformer block on n tokens of width d with an MLP of width hidden."""
    return _attention_flops(n, d) + 2 * n * d * hidden * 2  # + fc1 and fc2


def clip_forward_flops(cfg: CLIPConfig) -> int:
    """Forward FLOPs of one image-caption pair through CLIP (both towers, both projections).

    Args:
        cfg: the architecture.

    Returns:
        FLOPs per pair (2 per multiply-add).
    """
    v, t = cfg.vision, cfg.text
    image = vit_forward_flops(v.vit) + 2 * v.width * cfg.embed_dim  # the ViT without head, then proj
    text = t.layers * _block_flops(t.context_length, t.width, int(t.width * t.mlp_ratio)) + 2 * t.width * cfg.embed_dim
    return image + text


def cappa_forward_flops(cfg: CapPaConfig) -> int:
    """Forward FLOPs of one image-caption pair through CapPa (the tower, the projection of every image
    token, the decoder, the vocabulary head).

    Args:
        cfg: the architecture.

    Returns:
        FLOPs per pair (2 per multiply-add).
    """
    v, dec = cfg.vision, cfg.decoder
    m, n, d = v.vit.seq_len, dec.context_length, dec.width  # image tokens, caption tokens, decoder width
    image = vit_forward_flops(v.vit) + 2 * m * v.width * d  # the ViT without head, then proj on every token
    cross = (2 * n * d * d  # q
             + 2 * m * d * 2 * d  # k and v of the image tokens
             + 2 * n * m * d  # Q K^T
             + 2 * n * m * d  # A V
             + 2 * n * d * d)  # proj
    block = _block_flops(n, d, dec.mlp_hidden) + cross
    return image + dec.layers * block + 2 * n * d * dec.vocab_size


def cappa_layer_flops(cfg: CapPaConfig) -> list[int]:
    """Forward FLOPs of one image-caption pair through each layer of ``cappa.cappa_layers`` (the
    embeddings, the image blocks, the decoder blocks, the head: every image token's projection and the
    vocabulary head), in order; they sum to ``cappa_forward_flops``."""
    v, dec = cfg.vision, cfg.decoder
    image = vit_layer_flops(v.vit)  # [patch embedding, blocks..., no head]
    m, n, d = v.vit.seq_len, dec.context_length, dec.width
    block = _block_flops(n, d, dec.mlp_hidden) + 2 * n * d * d + 2 * m * d * 2 * d + 4 * n * m * d + 2 * n * d * d
    return [image[0], *image[1:-1], *[block] * dec.layers, 2 * m * v.width * d + 2 * n * d * dec.vocab_size]


def vit_layer_flops(cfg: ViTConfig) -> list[int]:
    """Forward FLOPs of one image through each pipeline layer of a ViT (``models/pipeline.py``'s
    ``vit_layers``: the embedding, each block, the head), in order; they sum to ``vit_forward_flops``."""
    first_moe = cfg.depth - cfg.moe_blocks  # the last moe_blocks blocks are Soft MoE
    d, n = cfg.embed_dim, _block_tokens(cfg)
    blocks = [_block_flops(n, d, cfg.mlp_hidden) if i < first_moe else
              _attention_flops(n, d) + soft_moe_flops(n, d, cfg.mlp_hidden, cfg.moe_experts * cfg.moe_slots)
              for i in range(cfg.depth)]
    return [_patch_embed_flops(cfg, cfg.num_patches) + _tape_flops(cfg), *blocks, 2 * d * cfg.num_classes]


def clip_layer_flops(cfg: CLIPConfig) -> list[int]:
    """Forward FLOPs of one image-caption pair through each pipeline layer of a CLIP (``clip_layers``:
    the embedding of both towers, the image blocks, the text blocks, the head with both
    projections), in order; they sum to ``clip_forward_flops``."""
    v, t = cfg.vision, cfg.text
    image = vit_layer_flops(v.vit)
    text_block = _block_flops(t.context_length, t.width, int(t.width * t.mlp_ratio))
    head = image[-1] + 2 * v.width * cfg.embed_dim + 2 * t.width * cfg.embed_dim
    return [image[0], *image[1:-1], *[text_block] * t.layers, head]


def layer_flops(cfg_or_model: nn.Module | ViTConfig) -> list[int]:
    """Forward FLOPs per sample of each pipeline layer, in layer order (what a pipeline stage's
    share of the work is made of)."""
    cfg = getattr(cfg_or_model, "cfg", cfg_or_model)
    if isinstance(cfg, CLIPConfig):
        return clip_layer_flops(cfg)
    if isinstance(cfg, CapPaConfig):
        return cappa_layer_flops(cfg)
    if isinstance(cfg, ViTConfig):
        return vit_layer_flops(cfg)
    forward_flops(cfg)  # raises the error that names the known families
    raise AssertionError


# Config type -> forward-FLOPs formula. A new model family adds its entry here.
_FORMULAS: dict[type, Callable[[Any], int]] = {
    ViTConfig: vit_forward_flops,
    CLIPConfig: clip_forward_flops,
    CapPaConfig: cappa_forward_flops,
}


def forward_flops(cfg_or_model: nn.Module | ViTConfig) -> int:
    """Forward FLOPs per sample of a model (anything with a ``.cfg``) or of a config.

    Args:
        cfg_or_model: a config of a known family, or a model holding one as ``.cfg``.

    Returns:
        FLOPs per sample (2 per multiply-add).

    Raises:
        TypeError: for an object that is neither a known config nor has one as ``.cfg``.
    """
    cfg = getattr(cfg_or_model, "cfg", cfg_or_model)
    for cfg_type, formula in _FORMULAS.items():
        if isinstance(cfg, cfg_type):
            return formula(cfg)
    known = ", ".join(t.__name__ for t in _FORMULAS)
    raise TypeError(f"no FLOP formula for {type(cfg_or_model).__name__}: pass one of {known}, or a model "
                    f"built by vitscale.models.create_model (it carries one as .cfg); a new model family "
                    f"needs an entry in vitscale/models/flops.py")


def train_flops(cfg_or_model: nn.Module | ViTConfig, recompute: bool = False) -> int:
    """FLOPs per training sample (forward + backward).

    Args:
        cfg_or_model: as for ``forward_flops``.
        recompute: count the forward that full activation checkpointing reruns (HFU).

    Returns:
        3 x forward, or 4 x forward with ``recompute``.
    """
    return (4 if recompute else 3) * forward_flops(cfg_or_model)
