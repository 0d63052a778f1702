"""CLIP (Radford et al. 2021): a ViT image tower and a causal text transformer, sized as open_clip.

Every size equals the open_clip config of the same name (``OPEN_CLIP_NAMES``), parameter
for parameter, and ``to_open_clip_state_dict`` / ``from_open_clip_state_dict`` convert
weights both ways exactly, so ``open_clip.create_model('ViT-B-32')`` loads ours with
``strict=True`` and computes the same embeddings.

Naming. The transformer blocks of both towers are ``vitscale.models.vit.Block``s (a
subclass that sets open_clip's LayerNorm epsilon, activation and causal mask), with
timm's names ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
That is the one deliberate difference from open_clip's names, and it buys everything the
ViT has: ``tensor_parallel.parallelize_vit`` shards both towers unchanged (it looks for
``attn.qkv``/``attn.proj``/``attn.num_heads`` and ``mlp.fc1``/``mlp.fc2``), pipeline
partitions count ``Block``s, and activation checkpointing names the same class. The
towers are the submodules ``visual`` and ``text``; everything else keeps open_clip's
names. The mapping, for both towers (open_clip's text tower sits at the top level):

    ours                                 open_clip
    visual.blocks.N.norm1                visual.transformer.resblocks.N.ln_1
    visual.blocks.N.attn.qkv.weight      visual.transformer.resblocks.N.attn.in_proj_weight
    visual.blocks.N.attn.qkv.bias        visual.transformer.resblocks.N.attn.in_proj_bias
    visual.blocks.N.attn.proj            visual.transformer.resblocks.N.attn.out_proj
    visual.blocks.N.norm2                visual.transformer.resblocks.N.ln_2
    visual.blocks.N.mlp.fc1 / fc2        visual.transformer.resblocks.N.mlp.c_fc / c_proj
    text.blocks.N.<as above>             transformer.resblocks.N.<as above>
    text.token_embedding, text.positional_embedding, text.ln_final, text.text_projection
                                         token_embedding, positional_embedding, ln_final, text_projection

``qkv.weight`` and ``in_proj_weight`` share one layout (rows: q, k, v, each heads x
head_dim), so the conversion only renames keys; no tensor is reshaped or copied.

Architecture, as open_clip's default (non-"custom") CLIP: pre-norm blocks with LayerNorm
eps 1e-5; GELU, or QuickGELU (``quick_gelu=True``, OpenAI's original weights);
image tower conv1 (no bias) -> class embedding -> position embedding -> ``ln_pre`` ->
blocks -> ``ln_post`` on the class token -> ``proj``; text tower token + position
embedding -> causal blocks -> ``ln_final`` -> the end-of-text token's features (the
largest token id, open_clip's ``text_pool_type='argmax'``) -> ``text_projection``.
The logit scale is a learned log-temperature initialised to log(1/0.07); ``forward``
returns its ``exp()`` unclamped, as open_clip does. The parameter lives in [0, log 100]:
``clamped_parameters()`` says so, and the trainer clamps it (and the optimizer's fp32 master
copy of it) after each optimizer step, as open_clip_train does; ``clamp_logit_scale_`` does
it on a plain model. A CLIP built with ``init_logit_bias`` (open_clip's option, set for
SigLIP's sigmoid loss: bias -10, logit scale log 10) also learns a ``logit_bias``, and
``forward`` returns it fourth, as open_clip's ``CLIP.forward`` does.

Plain single-device torch: parallelism is applied to a built model elsewhere.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitscale.models.registry import register_model
from vitscale.models.moe import SoftMoE
from vitscale.models.noise import assign_noise_sites
from vitscale.models.vit import Block, ViTConfig, init_by_name, patchify

__all__ = ["CLIPVisionConfig", "CLIPTextConfig", "CLIPConfig", "CLIP", "CLIPBlock", "VisionTower", "TextTower",
           "QuickGELU", "CLIP_SIZES", "OPEN_CLIP_NAMES", "LOGIT_SCALE_MAX", "clip_config", "build_clip",
           "clip_init_weights", "clip_initial_value", "run_blocks", "to_open_clip_state_dict",
           "from_open_clip_state_dict"]

LOGIT_SCALE_MAX = math.log(100)  # open_clip_train clamps logit_scale to [0, log 100] after each step


def _check_positive(owner: str, obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"CLIP option {owner}.{name}={value!r} must be a positive integer")


@dataclass
class CLIPVisionConfig:
    """The image tower; field names and defaults are open_clip's ``vision_cfg``."""

    image_size: int = 224  # pixels, square input
    patch_size: int = 16  # pixels per patch side
    width: int = 768  # token width D
    layers: int = 12  # number of blocks
    head_width: int = 64  # channels per head: heads = width / head_width
    mlp_ratio: float = 4.0  # MLP hidden width = int(width * mlp_ratio)
    # Architecture options of the ViT (``vit.ViTConfig``); open_clip has none of them, so they
    # leave ``CLIPConfig.to_dict`` only when set, and then open_clip cannot rebuild the model.
    qk_norm: bool = False  # LayerNorm on queries and keys per head (ViT-22B)
    dual_patchnorm: bool = False  # LayerNorm before and after the patch embedding
    moe_blocks: int = 0  # Soft MoE in place of the MLP of the last N image blocks
    moe_experts: int = 8
    moe_slots: int = 1

    def __post_init__(self):
        _check_positive("vision", self, ("image_size", "patch_size", "width", "layers", "head_width"))
        if self.image_size % self.patch_size:
            nearest = self.patch_size * max(1, round(self.image_size / self.patch_size))
            raise ValueError(f"CLIP option vision.image_size={self.image_size} must be divisible by "
                             f"vision.patch_size={self.patch_size}; use e.g. vision.image_size={nearest}")
        if self.width % self.head_width:
            raise ValueError(f"CLIP option vision.width={self.width} must be divisible by "
                             f"vision.head_width={self.head_width} (heads = width / head_width)")
        if self.mlp_ratio <= 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"CLIP option vision.mlp_ratio={self.mlp_ratio} must give an MLP width >= 1")
        try:
            self.vit  # noqa: B018 (the ViT's own checks of the architecture options)
        except ValueError as e:
            message = str(e).replace("ViT option ", "vision.").replace("depth=", "vision.layers=")
            raise ValueError(f"CLIP image tower: {message}") from None

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def vit(self) -> ViTConfig:
        """The tower as a ViT without classifier (what its blocks and FLOPs are built from)."""
        return ViTConfig(img_size=self.image_size, patch_size=self.patch_size, embed_dim=self.width,
                         depth=self.layers, num_heads=self.heads, mlp_ratio=self.mlp_ratio, num_classes=0,
                         qk_norm=self.qk_norm, dual_patchnorm=self.dual_patchnorm, moe_blocks=self.moe_blocks,
                         moe_experts=self.moe_experts, moe_slots=self.moe_slots)

    def options(self) -> dict:
        """The architecture options set to other than their defaults (none exist in open_clip)."""
        return {f: getattr(self, f) for f in _VISION_OPTIONS if getattr(self, f) != getattr(CLIPVisionConfig, f)}


@dataclass
class CLIPTextConfig:
    """The text tower; field names and defaults are open_clip's ``text_cfg``."""

    context_length: int = 77  # tokens per caption, EOT included
    vocab_size: int = 49408  # OpenAI's BPE tokenizer
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _check_positive("text", self, ("context_length", "vocab_size", "width", "heads", "layers"))
        if self.width % self.heads:
            ok = [h for h in range(1, min(self.width, 64) + 1) if self.width % h == 0]
            raise ValueError(f"CLIP option text.width={self.width} must be divisible by text.heads={self.heads}; "
                             f"use text.heads in {ok}")
        if self.mlp_ratio <= 0 or int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"CLIP option text.mlp_ratio={self.mlp_ratio} must give an MLP width >= 1")


@dataclass
class CLIPConfig:
    """Both towers and the shared embedding; the model keeps it as ``model.cfg``.

    ``CLIPConfig.from_dict`` reads open_clip's model-config JSON (``embed_dim``,
    ``quick_gelu``, ``vision_cfg``, ``text_cfg``); ``to_dict`` writes it back.
    """

    embed_dim: int = 512  # the joint image-text embedding
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    quick_gelu: bool = False  # x * sigmoid(1.702 x) as OpenAI's weights; open_clip's own configs use GELU
    init_logit_scale: float = math.log(1 / 0.07)  # log of the inverse softmax temperature
    init_logit_bias: float | None = None  # a learned logit bias from this value (SigLIP: -10); None = no bias

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = CLIPVisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = CLIPTextConfig(**self.text)
        _check_positive("clip", self, ("embed_dim",))

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """From open_clip's JSON layout (``vision_cfg``/``text_cfg``) or ours (``vision``/``text``)."""
        d = dict(d)
        vision, text = d.pop("vision_cfg", d.pop("vision", {})), d.pop("text_cfg", d.pop("text", {}))
        return cls(vision=_merged(CLIPVisionConfig, CLIPVisionConfig(), vision, "vision"),
                   text=_merged(CLIPTextConfig, CLIPTextConfig(), text, "text"), **_checked(cls, d, "clip"))

    def to_dict(self) -> dict:
        """open_clip's JSON layout: ``open_clip.model.CLIP(**cfg.to_dict())`` builds the same model."""
        vision = {k: v for k, v in dataclasses.asdict(self.vision).items()
                  if k not in _VISION_OPTIONS or k in self.vision.options()}
        bias = {} if self.init_logit_bias is None else {"init_logit_bias": self.init_logit_bias}
        return dict(embed_dim=self.embed_dim, quick_gelu=self.quick_gelu, init_logit_scale=self.init_logit_scale,
                    **bias, vision_cfg=vision, text_cfg=dataclasses.asdict(self.text))


_VISION_OPTIONS = ("qk_norm", "dual_patchnorm", "moe_blocks", "moe_experts", "moe_slots")


def _checked(cls, options: dict, owner: str) -> dict:
    fields = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown CLIP option(s) {[f'{owner}.{u}' for u in unknown]}; valid {owner} options: "
                         f"{', '.join(fields)}")
    return options


def _merged(cls, base, options: dict, owner: str):
    return dataclasses.replace(base, **_checked(cls, dict(options), owner))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPBlock(Block):
    """``vit.Block`` with open_clip's choices: LayerNorm eps 1e-5 (timm's ViT uses 1e-6),
    GELU or QuickGELU, and an optional causal mask. Being a ``Block``, it is sharded,
    partitioned and checkpointed as the ViT's blocks are.

    Args:
        width: token width D.
        heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        causal: attend only to the same and earlier positions (the text tower).
        quick_gelu: QuickGELU instead of exact GELU.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool = False, quick_gelu: bool = False,
                 qk_norm: bool = False, moe: tuple[int, int] | None = None):
        # Only the block fields of this ViTConfig are read; the image fields are placeholders.
        experts, slots = moe or (1, 1)
        super().__init__(ViTConfig(img_size=1, patch_size=1, embed_dim=width, depth=1, num_heads=heads,
                                   mlp_ratio=mlp_ratio, num_classes=0, qk_norm=qk_norm, moe_experts=experts,
                                   moe_slots=slots), moe=moe is not None)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-5), nn.LayerNorm(width, eps=1e-5)
        self.attn.causal = causal
        if quick_gelu:
            self.mlp.act = QuickGELU()  # a Soft MoE's experts too: they call self.mlp.act


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, every: int, training: bool) -> torch.Tensor:
    """``blocks(x)``, with activation checkpointing in chunks of ``every`` blocks while training (0: none)."""
    # Activation checkpointing in chunks of ``every`` blocks, as VisionTransformer.forward_features.
    if every and training and torch.is_grad_enabled():
        layers = list(blocks)
        for i in range(0, len(layers), every):
            x = checkpoint(nn.Sequential(*layers[i:i + every]), x, use_reentrant=False)
        return x
    return blocks(x)


class VisionTower(nn.Module):
    """Images (B, 3, H, W) -> image embeddings (B, E): ``embed`` -> ``blocks`` -> ``forward_head``."""

    def __init__(self, cfg: CLIPVisionConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.vit.seq_len, width))  # class token first
        # Dual PatchNorm (Kumar et al. 2023): LayerNorm over each flattened patch before conv1, and
        # over each token after it. Our names: open_clip has no such option.
        self.patch_norm_pre = nn.LayerNorm(3 * cfg.patch_size**2, eps=1e-5) if cfg.dual_patchnorm else None
        self.patch_norm = nn.LayerNorm(width, eps=1e-5) if cfg.dual_patchnorm else None
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        first_moe = cfg.layers - cfg.moe_blocks
        self.blocks = nn.Sequential(*[CLIPBlock(width, cfg.heads, cfg.mlp_ratio, quick_gelu=quick_gelu,
                                                qk_norm=cfg.qk_norm,
                                                moe=(cfg.moe_experts, cfg.moe_slots) if i >= first_moe else None)
                                      for i in range(cfg.layers)])
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(torch.empty(width, embed_dim))  # no bias; x @ proj, as open_clip
        self.grad_checkpointing = 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1 + N, D): patches, class token, positions, ``ln_pre``.

        Raises:
            ValueError: when H x W is not the ``image_size`` the position embedding was built for.
        """
        size = self.cfg.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"input images are {tuple(images.shape[-2:])} pixels but the CLIP image tower was "
                             f"built with vision.image_size={size}; resize the input or build with "
                             f"vision.image_size={images.shape[-1]}")
        if self.patch_norm_pre is not None:
            x = self.patch_norm_pre(patchify(images, self.cfg.patch_size))  # (B, N, 3 p p)
            x = self.patch_norm(F.linear(x, self.conv1.weight.flatten(1)))  # conv1 as a linear map of each patch
        else:
            x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + N, D) after the blocks -> embeddings (B, E): ``ln_post`` of the class token, ``proj``.
        (open_clip normalises every token and then takes the first: the same numbers.)"""
        return self.ln_post(x[:, 0]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.embed(images), self.grad_checkpointing, self.training)
        return self.forward_head(x)


class TextTower(nn.Module):
    """Token ids (B, L) -> text embeddings (B, E): ``embed`` -> causal ``blocks`` -> ``forward_head``."""

    def __init__(self, cfg: CLIPTextConfig, embed_dim: int, quick_gelu: bool = False):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.blocks = nn.Sequential(*[CLIPBlock(width, cfg.heads, cfg.mlp_ratio, causal=True, quick_gelu=quick_gelu)
                                      for _ in range(cfg.layers)])
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))  # no bias, as open_clip's default
        self.grad_checkpointing = 0

    @staticmethod
    def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
        """Position of each caption's end-of-text token (B,): the largest id in the row, as
        OpenAI's tokenizer gives EOT the largest id (open_clip's ``text_pool_type='argmax'``)."""
        return tokens.argmax(dim=-1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> tokens (B, L, D). L may be shorter than ``context_length``
        (positions are causal, so a prefix computes the same as in the padded caption).

        Raises:
            ValueError: when L exceeds ``context_length``.
        """
        n = tokens.shape[-1]
        if n > self.cfg.context_length:
            raise ValueError(f"captions of {n} tokens exceed text.context_length={self.cfg.context_length}; "
                             f"tokenize with context_length={self.cfg.context_length} or build with "
                             f"text.context_length={n}")
        return self.token_embedding(tokens) + self.positional_embedding[:n]

    def forward_head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D) after the blocks and EOT positions (B,) -> embeddings (B, E)."""
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, D): only EOT features are used
        return self.ln_final(x) @ self.text_projection  # LayerNorm is per token: pooling first is the same

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.embed(tokens), self.grad_checkpointing, self.training)
        return self.forward_head(x, self.eot_positions(tokens))


class CLIP(nn.Module):
    """Contrastive image-text model: ``visual`` and ``text`` towers, ``logit_scale`` and, with
    ``cfg.init_logit_bias`` set (SigLIP), ``logit_bias``.

    Args:
        cfg: the architecture; kept as ``self.cfg`` (read by ``models/flops.py``).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.quick_gelu)
        # Shape (1,), where open_clip has a 0-d scalar: DeepSpeed cannot broadcast or partition
        # 0-d parameters. The open_clip conversions reshape it (``to/from_open_clip_state_dict``).
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        assign_noise_sites(self)
        # open_clip's name and init; (1,) for the same reason as logit_scale.
        self.logit_bias = (nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``clip_init_weights`` seeded from torch's current RNG, so ``torch.manual_seed(s)``
        before building fixes every weight. Parameters on the meta device are left alone:
        materialise them later with ``clip_init_weights``."""
        if not self.logit_scale.is_meta:
            clip_init_weights(self, self.cfg, int(torch.randint(0, 2**62, (), device="cpu").item()))

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute activations in backward in chunks of ``every`` blocks (0 turns it off), both towers."""
        self.visual.grad_checkpointing = self.text.grad_checkpointing = every

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (open_clip's, plus the logit scale and bias it
        exempts as 0-d parameters)."""
        names = {"visual.class_embedding", "visual.positional_embedding", "text.positional_embedding", "logit_scale"}
        return names | ({"logit_bias"} if self.logit_bias is not None else set())

    def clamped_parameters(self) -> dict[str, tuple[float, float]]:
        """Parameters that live in a closed interval, ``{name: (low, high)}``: ``logit_scale`` in
        [0, log 100], so the temperature never exceeds 100 (open_clip_train clamps it after each
        optimizer step). Whoever steps an optimizer on this model clamps them after each step."""
        return {"logit_scale": (0.0, LOGIT_SCALE_MAX)}

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp ``logit_scale`` to [0, log 100] in place (``clamped_parameters``); call after
        each optimizer step of a plain model, as open_clip_train does."""
        self.logit_scale.clamp_(*self.clamped_parameters()["logit_scale"])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) -> embeddings (B, E), unit length with ``normalize``."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (B, L) -> embeddings (B, E), unit length with ``normalize``."""
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """What open_clip's ``CLIP.forward`` returns. ``noise`` (sample keys, ``models/noise.py``)
        is accepted as every model here accepts it; the towers have no stochastic layers (open_clip's
        have none either), so nothing draws from it.

        Returns:
            Normalised image embeddings (B, E), normalised text embeddings (B, E),
            ``logit_scale.exp()`` (the inverse temperature the loss multiplies logits by), and
            ``logit_bias`` when the model has one (SigLIP), all scalars 0-d.
        """
        out = (self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True),
               self.logit_scale.exp()[0])
        return out if self.logit_bias is None else (*out, self.logit_bias[0])


def clip_initial_value(name: str, module: nn.Module, shape: tuple[int, ...], gen: torch.Generator,
                       cfg: CLIPConfig) -> torch.Tensor:
    """The initial value of parameter ``name`` (its name in the whole CLIP) of ``module``, full ``shape``,
    drawn from ``gen`` (``clip_init_weights``'s rules; CapPa's image tower uses them too)."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if isinstance(module, SoftMoE):
        return module.initial_value(leaf, shape, gen)
    if leaf == "bias":
        return torch.zeros(shape)
    if name == "logit_scale":
        return torch.full(shape, float(cfg.init_logit_scale))
    if name == "logit_bias":
        return torch.full(shape, float(cfg.init_logit_bias))
    out = torch.empty(shape)
    tower = cfg.vision if name.startswith("visual.") else cfg.text
    width = tower.width
    # Blocks: OpenAI's / open_clip's text-tower rule, used for both towers (open_clip leaves the
    # image blocks at torch's defaults and has this rule commented out there).
    if ".blocks." in name:
        proj_std = width**-0.5 * (2 * tower.layers)**-0.5  # residual outputs shrink with depth
        std = {"qkv": width**-0.5, "fc1": (2 * width)**-0.5, "proj": proj_std, "fc2": proj_std}.get(
            name.rsplit(".", 2)[-2])
        if std is not None and leaf == "weight":
            return nn.init.normal_(out, std=std, generator=gen)
    elif name == "visual.conv1.weight":  # the std of torch's default conv init, which open_clip keeps
        return nn.init.normal_(out, std=(3 * math.prod(shape[1:]))**-0.5, generator=gen)
    elif name in ("visual.class_embedding", "visual.positional_embedding", "visual.proj", "text.text_projection"):
        return nn.init.normal_(out, std=width**-0.5, generator=gen)
    elif name == "text.token_embedding.weight":
        return nn.init.normal_(out, std=0.02, generator=gen)
    elif name == "text.positional_embedding":
        return nn.init.normal_(out, std=0.01, generator=gen)
    raise ValueError(f"clip_init_weights: no rule for parameter {name!r} of {type(module).__name__}")


def clip_init_weights(module: nn.Module, cfg: CLIPConfig, seed: int, prefix: str = "") -> nn.Module:
    """open_clip's CLIP init, each parameter from its own stream keyed by (seed, full name).

    Normal with open_clip's stds: token embedding .02, text positions .01, image class
    and position embeddings and both projections width^-1/2; in every block qkv
    width^-1/2, fc1 (2 width)^-1/2, proj and fc2 width^-1/2 (2 layers)^-1/2; conv1
    (3 fan_in)^-1/2; zero biases, unit LayerNorms, ``logit_scale`` = ``cfg.init_logit_scale``,
    ``logit_bias`` = ``cfg.init_logit_bias``.

    As ``vit.init_weights``: no value depends on the order of the others, so a piece of
    the model (``prefix`` = its name in the whole model, e.g. ``"text.blocks.3"``) or a
    tensor-parallel shard (a module with ``full_shape`` / ``shard``) gets exactly what it
    holds in the whole model. Parameters on the meta device are skipped.

    Args:
        module: the CLIP or a piece of it.
        cfg: the whole model's config (the stds depend on tower width and depth).
        seed: the weight seed.
        prefix: ``module``'s name in the whole model.

    Returns:
        ``module``.
    """
    return init_by_name(module, seed, prefix,
                        lambda name, mod, shape, gen: clip_initial_value(name, mod, shape, gen, cfg))


# ---- open_clip interop: key renames only (see the module docstring) ----

# (ours, open_clip) for the parts of a block; in_proj_* are parameters of open_clip's
# nn.MultiheadAttention itself, hence no ".weight" suffix to keep.
_BLOCK_PARTS = [("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                ("attn.proj.", "attn.out_proj."), ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                ("mlp.fc2.", "mlp.c_proj.")]
_TOWERS = [("visual.blocks.", "visual.transformer.resblocks."), ("text.blocks.", "transformer.resblocks.")]
_TEXT_TOP = ("token_embedding.", "positional_embedding", "ln_final.", "text_projection")


def _rename(key: str, to_open_clip: bool) -> str:
    for ours_tower, theirs_tower in _TOWERS:
        src, dst = (ours_tower, theirs_tower) if to_open_clip else (theirs_tower, ours_tower)
        m = re.match(re.escape(src) + r"(\d+)\.(.*)$", key)
        if m:
            index, rest = m.groups()
            for ours, theirs in _BLOCK_PARTS:
                a, b = (ours, theirs) if to_open_clip else (theirs, ours)
                if rest.startswith(a):
                    return f"{dst}{index}.{b}{rest[len(a):]}"
            raise KeyError(f"no open_clip mapping for block parameter {key!r}")
    if to_open_clip and key.startswith("text.") and key[len("text."):].startswith(_TEXT_TOP):
        return key[len("text."):]
    if not to_open_clip and key.startswith(_TEXT_TOP):
        return "text." + key
    return key


_SCALARS = ("logit_scale", "logit_bias")  # (1,) here, 0-d in open_clip


def to_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our CLIP's state dict -> open_clip's ``CLIP`` names (same tensors, renamed keys; ``logit_scale``
    and ``logit_bias`` viewed as open_clip's 0-d scalars).

    Args:
        state_dict: from ``CLIP.state_dict()`` (a full, unsharded model).

    Returns:
        A dict that ``open_clip.create_model(<matching name>).load_state_dict(sd, strict=True)`` loads.
    """
    return {_rename(k, True): v.reshape(()) if k in _SCALARS else v for k, v in state_dict.items()}


def from_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's ``CLIP`` state dict -> ours (same tensors, renamed keys). The non-persistent
    ``attn_mask`` buffer is not in a state dict; if a checkpoint carries one it is dropped.

    Args:
        state_dict: from ``open_clip.create_model(name).state_dict()`` or a checkpoint of it.

    Returns:
        A dict that ``CLIP.load_state_dict(sd, strict=True)`` loads.
    """
    return {_rename(k, False): v.reshape(1) if k in _SCALARS else v for k, v in state_dict.items()
            if k != "attn_mask"}


# ---- sizes: open_clip's model configs as data (open_clip/model_configs/<name>.json) ----

_TEXT_B = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
_TEXT_H = dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24)
CLIP_SIZES: dict[str, dict] = {
    "clip_vit_b32": dict(embed_dim=512, vision=dict(image_size=224, patch_size=32, width=768, layers=12), text=_TEXT_B),
    "clip_vit_b16": dict(embed_dim=512, vision=dict(image_size=224, patch_size=16, width=768, layers=12), text=_TEXT_B),
    "clip_vit_l14": dict(embed_dim=768, vision=dict(image_size=224, patch_size=14, width=1024, layers=24),
                         text=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)),
    "clip_vit_h14": dict(embed_dim=1024, vision=dict(image_size=224, patch_size=14, width=1280, layers=32,
                                                     head_width=80), text=_TEXT_H),
    "clip_vit_g14": dict(embed_dim=1024, vision=dict(image_size=224, patch_size=14, width=1408, layers=40,
                                                     head_width=88, mlp_ratio=4.3637), text=_TEXT_H),
    # CPU tests and smoke runs: 4 x 4 patches, 2 + 2 blocks of width 64, a small vocabulary.
    "clip_tiny": dict(embed_dim=32, vision=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
                      text=dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=2)),
}
OPEN_CLIP_NAMES = {"clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16", "clip_vit_l14": "ViT-L-14",
                   "clip_vit_h14": "ViT-H-14", "clip_vit_g14": "ViT-g-14"}  # clip_tiny has no open_clip twin


def clip_config(name: str, /, **overrides) -> CLIPConfig:
    """The config of a registered CLIP size without building weights.

    Args:
        name: a key of ``CLIP_SIZES``, e.g. ``clip_vit_b32``.
        overrides: top-level ``CLIPConfig`` fields (``embed_dim``, ``quick_gelu``,
            ``init_logit_scale``, ``init_logit_bias``), and ``vision`` / ``text`` dicts whose keys replace
            the tower's fields, e.g. ``vision=dict(layers=2), text=dict(context_length=16)``.

    Returns:
        The validated config.

    Raises:
        ValueError: for an unknown size or option, or an invalid combination.
    """
    if name not in CLIP_SIZES:
        raise ValueError(f"unknown CLIP size {name!r}; use one of {', '.join(CLIP_SIZES)}")
    size = CLIP_SIZES[name]
    vision, text = overrides.pop("vision", None) or {}, overrides.pop("text", None) or {}
    for owner, value in (("vision", vision), ("text", text)):
        if not isinstance(value, dict):
            raise ValueError(f"CLIP option {owner}={value!r} must be a dict of {owner} tower fields, "
                             f"e.g. {owner}=dict(layers=2)")
    top = {k: v for k, v in size.items() if k not in ("vision", "text")}
    return CLIPConfig.from_dict({**top, **_checked(CLIPConfig, overrides, "clip"),
                                 "vision": {**size["vision"], **vision}, "text": {**size["text"], **text}})


def build_clip(name: str, /, **overrides) -> CLIP:
    """A CLIP of a registered size, initialised from torch's current RNG (see ``clip_config``)."""
    return CLIP(clip_config(name, **overrides))


def _make_builder(name: str):
    def builder(**overrides) -> CLIP:
        return build_clip(name, **overrides)

    size = CLIP_SIZES[name]
    v, t = size["vision"], size["text"]
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (f"CLIP {OPEN_CLIP_NAMES.get(name, 'tiny')}: embed {size['embed_dim']}; image {v['image_size']} "
                       f"px / patch {v['patch_size']}, width {v['width']}, {v['layers']} blocks; text width "
                       f"{t['width']}, {t['layers']} blocks, {t['heads']} heads. ``overrides`` as ``clip_config``.")
    return builder


for _name in CLIP_SIZES:
    register_model(_name, kind="clip")(_make_builder(_name))
