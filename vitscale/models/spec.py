"""A model resolved from the experiment's model section, once per start.

``resolve_model`` turns ``model.*`` (plus the image size and class count the data section states)
into a ``ModelSpec``: the registered name, its kind, the keyword arguments ``create_model`` takes,
the architecture they give, and what the rest of a start asks of the model (parameter count,
parameters without weight decay, the transformer stacks a layout splits, the text tower a
tokenizer needs, FLOPs per sample), all from one build on the meta device. This is the one place
that knows how config keys map onto each model family's options; the model classes know no config.

The loss a model trains with (``train.loss``) is resolved here too, because for a CLIP it is part
of the model: ``siglip`` builds the CLIP with a learned logit bias (open_clip's
``init_logit_bias=-10``) and logit scale log 10, as open_clip_train's ``--siglip`` does.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vitscale.config.schema import ConfigError, ModelConfig
from vitscale.models.cappa import CAPPA_NAMES
from vitscale.models.flops import forward_flops, packed_forward_flops
from vitscale.models.registry import ModelKind, create_model, list_models, model_kind

# The losses (``models/losses.py``) each kind of model trains with (``train.loss``), its default first.
LOSSES_BY_KIND: dict[str, tuple[str, ...]] = {"classifier": ("softmax", "sigmoid"), "clip": ("clip", "siglip"),
                                              "cappa": ("captioning",)}
# SigLIP's starting logit scale and bias (Zhai et al. 2023; open_clip_train's --siglip).
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}

# Model keys that only a ViT classifier has; a CLIP states its towers in model.vision / model.text.
VIT_ONLY = ("depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "global_pool",
            "drop_rate", "attn_drop_rate", "drop_path_rate", "bias", "parallel_block", "dual_patchnorm", "pos_embed",
            "moe", "adatape")


# Embedding parameters, by a component of their name: the patch embedding (a ViT's patch_embed, a CLIP
# image tower's conv1), position embeddings, class / register tokens, a text tower's token table.
# Kaplan et al. 2020 count N without them (non-embedding parameters), the size scaling laws fit best.
EMBEDDING_PARTS = ("patch_embed", "conv1", "pos_embed", "pos_embed_h", "pos_embed_w", "cls_token", "reg_token",
                   "class_embedding", "positional_embedding", "token_embedding")


def is_embedding(name: str) -> bool:
    """Whether the parameter ``name`` (e.g. ``patch_embed.proj.weight``) is an embedding parameter."""
    return any(part in EMBEDDING_PARTS for part in name.split("."))


@dataclass(frozen=True)
class TransformerStack:
    """One stack of blocks that tensor and pipeline parallelism split."""

    where: str  # for messages: "" (a ViT) or "the image tower of " / "the text tower of "
    heads: int
    width: int
    mlp_hidden: int  # MLP hidden width, split by tensor-parallel ranks
    blocks: int


@dataclass(frozen=True)
class ModelSpec:
    """A registered model with its options resolved (see the module docstring)."""

    name: str  # registered name, e.g. vit_tiny_patch16
    kind: ModelKind  # classifier | clip | cappa
    kwargs: dict  # create_model(name, **kwargs)
    arch: Any  # the architecture: vit.ViTConfig or clip.CLIPConfig
    parameters: int  # elements of the whole model (all stages and shards)
    no_weight_decay: frozenset[str] = field(default_factory=frozenset)  # the whole model's no_weight_decay()
    loss: str = ""  # the loss it trains with (resolve_loss): softmax | sigmoid (classifier), clip | siglip (CLIP),
    # captioning (CapPa)
    # Parameters kept in [low, high] after each optimizer step (the whole model's clamped_parameters(),
    # e.g. a CLIP's logit_scale in [0, log 100]), as sorted (name, (low, high)) pairs.
    clamped: tuple[tuple[str, tuple[float, float]], ...] = ()
    embedding_parameters: int = 0  # elements of the embedding parameters (is_embedding), all stages and shards

    @property
    def non_embedding_parameters(self) -> int:
        """Parameters without the embeddings (Kaplan et al. 2020's N): blocks, norms, heads, projections."""
        return self.parameters - self.embedding_parameters

    def create(self) -> nn.Module:
        """The whole model on torch's current default device, freshly initialised."""
        return create_model(self.name, **self.kwargs)

    def meta(self) -> nn.Module:
        """The whole model on the meta device: structure and shapes, no memory."""
        with torch.device("meta"):
            return self.create()

    @property
    def stacks(self) -> list[TransformerStack]:
        """The transformer stacks in forward order (a CLIP: image tower, then text tower)."""
        a = self.arch
        if self.kind == "cappa":
            return [TransformerStack("the image tower of ", a.vision.heads, a.vision.width,
                                     int(a.vision.width * a.vision.mlp_ratio), a.vision.layers),
                    TransformerStack("the text decoder of ", a.decoder.heads, a.decoder.width, a.decoder.mlp_hidden,
                                     a.decoder.layers)]
        if self.kind == "clip":
            return [TransformerStack("the image tower of ", a.vision.heads, a.vision.width,
                                     int(a.vision.width * a.vision.mlp_ratio), a.vision.layers),
                    TransformerStack("the text tower of ", a.text.heads, a.text.width,
                                     int(a.text.width * a.text.mlp_ratio), a.text.layers)]
        return [TransformerStack("", a.num_heads, a.embed_dim, a.mlp_hidden, a.depth)]

    @property
    def text(self):
        """The text tower's config (vocab_size, context_length, ...) of a CLIP, a CapPa's decoder's; None for a
        classifier."""
        return self.arch.text if self.kind in ("clip", "cappa") else None

    def forward_flops(self, packed_seq_len: int = 0, packed_images: int = 0) -> int:
        """Forward FLOPs of one sample: an image, an image-caption pair, or (``packed_seq_len`` > 0) a
        packed sequence of up to ``packed_images`` images (``models/flops.py``)."""
        if packed_seq_len:
            return packed_forward_flops(self.arch, packed_seq_len, packed_images)
        return forward_flops(self.arch)


def resolve_loss(loss: str | None, kind: str) -> str:
    """The loss a model of ``kind`` trains with for ``train.loss=loss``.

    ``None`` picks the kind's own (``softmax`` for a classifier, ``clip`` for a CLIP). A CLIP also
    reads ``softmax`` as ``clip`` (the contrastive loss is a softmax over the batch; the
    ``config.yaml`` of runs from before CLIP losses were named says ``softmax``).

    Raises:
        ConfigError: a loss the kind does not train with, naming the ones it does.
    """
    own = LOSSES_BY_KIND[kind]
    if loss is None or (kind == "clip" and loss == "softmax"):
        return own[0]
    if kind == "cappa":
        raise ConfigError(f"train.loss={loss} does not apply to train.objective=cappa, which minimises the captions' "
                          "next-token cross-entropy; remove train.loss")
    if loss not in own:
        other = "a CLIP" if kind == "classifier" else "a classifier"
        fix = {"sigmoid": "siglip", "clip": "softmax", "siglip": "sigmoid"}.get(loss)
        raise ConfigError(f"train.loss={loss} is a loss of {other}; a {kind} trains with train.loss "
                          f"{' or '.join(own)}" + (f" (e.g. train.loss={fix})" if fix else ""))
    return loss


def resolve_model(model: ModelConfig, image_size: int, num_classes: int, loss: str | None = None,
                  objective: str | None = None) -> ModelSpec:
    """The model ``model.*`` describes at ``image_size`` px with ``num_classes`` classes, to train
    with ``train.loss=loss`` (``resolve_loss``; ``siglip`` gives the CLIP its logit bias).
    ``objective="cappa"`` (``train.objective``) turns a CLIP size into its CapPa twin (``models/cappa.py``:
    the image tower, a text decoder from ``model.decoder``, no text tower).

    Raises:
        ConfigError: an unknown name, an option the model family does not have, a loss it does not
            train with, or options the model's own checks refuse; the message names the key and the fix.
    """
    if model.name not in list_models():
        near = difflib.get_close_matches(model.name, list_models(), n=3, cutoff=0.4)
        raise ConfigError(f"model.name='{model.name}' is not a registered model"
                          + (f"; did you mean {', '.join(near)}?" if near else "")
                          + " (vitscale.models.list_models() lists them all)")
    kind, name = model_kind(model.name), model.name
    if objective == "cappa" and kind == "classifier":
        raise ConfigError(f"train.objective=cappa trains a CLIP size's image tower with a text decoder on image-text "
                          f"data; model.name={model.name} is a ViT classifier: use a clip_* model (e.g. clip_tiny)")
    if objective == "cappa" and kind == "clip":
        kind, name = "cappa", CAPPA_NAMES[model.name]
    loss = resolve_loss(loss, kind)
    if kind in ("clip", "cappa"):
        defaults = ModelConfig()
        stated = [k for k in VIT_ONLY if getattr(model, k) != getattr(defaults, k)]
        if stated:
            raise ConfigError(f"model.{stated[0]} is a ViT option; a CLIP states its towers in model.vision / "
                              f"model.text (open_clip's names, e.g. model.vision={{layers: 2}} model.text={{heads: 4}})")
        kwargs = _clip_kwargs(model, image_size, loss)
        if kind == "cappa":
            kwargs.pop("embed_dim", None)  # no joint embedding: the image tower projects to the decoder's width
            kwargs["text"] = {k: v for k, v in kwargs["text"].items() if k in ("vocab_size", "context_length")}
            kwargs["decoder"] = dataclasses.asdict(model.decoder)
    else:
        if model.vision or model.text:
            raise ConfigError(f"model.vision / model.text configure CLIP towers; {model.name} is a ViT classifier")
        kwargs = _classifier_kwargs(model, image_size, num_classes)
    try:
        with torch.device("meta"):
            built = create_model(name, **kwargs)
    except ValueError as e:  # the model's own checks (e.g. image size vs patch size)
        raise ConfigError(f"model {name} with data.image_size={image_size}: {e}") from None
    clamped = getattr(built, "clamped_parameters", dict)()
    return ModelSpec(name=name, kind=kind, kwargs=kwargs, arch=built.cfg,
                     parameters=sum(p.numel() for p in built.parameters()),
                     embedding_parameters=sum(p.numel() for n, p in built.named_parameters() if is_embedding(n)),
                     no_weight_decay=frozenset(built.no_weight_decay()), loss=loss,
                     clamped=tuple(sorted((k, (float(lo), float(hi))) for k, (lo, hi) in clamped.items())))


def _classifier_kwargs(m: ModelConfig, image_size: int, num_classes: int) -> dict:
    """A ViT's options: the model section's fields are ViTConfig's, None keeping the size's default."""
    kwargs = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name not in ("name", "init", "vision", "text", "bias", "moe", "decoder", "adatape", "sparsity")
              and getattr(m, f.name) is not None}
    if m.bias is not None:  # one switch for the QKV and LayerNorm biases, as ViT-22B drops both
        kwargs.setdefault("qkv_bias", m.bias)
        kwargs["norm_bias"] = m.bias
    if m.moe.blocks:
        kwargs.update(moe_blocks=m.moe.blocks, moe_experts=m.moe.experts, moe_slots=m.moe.slots)
    if m.adatape.bank is not None:
        a = m.adatape
        kwargs.update(adatape_bank=a.bank, adatape_bank_size=a.bank_size, adatape_max_tokens=a.max_tokens,
                      adatape_threshold=a.threshold)
    kwargs.update(img_size=image_size, num_classes=num_classes)
    return kwargs


def _clip_kwargs(m: ModelConfig, image_size: int, loss: str) -> dict:
    """A CLIP's options: open_clip's tower fields in model.vision / model.text; patch_size and embed_dim;
    SigLIP's logit scale and bias for ``loss == "siglip"``."""
    vision = {**(m.vision or {}), "image_size": image_size}
    if m.patch_size is not None:
        vision["patch_size"] = m.patch_size
    kwargs = {"vision": vision, "text": dict(m.text or {})}
    if m.embed_dim is not None:
        kwargs["embed_dim"] = m.embed_dim
    if loss == "siglip":
        kwargs.update(SIGLIP_INIT)
    return kwargs
