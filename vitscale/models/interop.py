"""Weights between layouts and libraries: merge and split tensor-parallel shards, map
pipeline layers to whole-model names, and write timm / open_clip state dicts.

A training run holds its weights in pieces (the export tool reads them from a
DeepSpeed checkpoint of any layout); this module turns the pieces into one plain
state dict of the whole model with our names, and back:

    tensor ranks' shards ──merge_tensor_parallel──▶ whole model
    whole model ──shard_state_dict──▶ one tensor shard / pipeline layer / stage
    pipeline layers (layer index -> state dict) ──pipeline_to_whole──▶ whole-model names

Which tensors are sharded, and how, is read from the sharded model itself (a
``tensor_parallel.ColumnParallelLinear`` / ``RowParallelLinear`` / ``ShardedParallelBlock``
says ``is_sharded(name)`` and ``merge``s its own slices), so merging is exactly the
inverse of the ``shard()`` that initialised and trained the shards, for every model ``parallelize_vit`` shards (ViT, both CLIP towers).
Build that model on the meta device: only its structure is read.

Our ViT's state dict *is* timm's (``vit.py``), so ``to_timm`` only checks; CLIP keys are
renamed for open_clip by ``clip.to_open_clip_state_dict``. Pure torch: nothing here starts
or needs a process group.
"""
from __future__ import annotations

import logging
from typing import Literal, Mapping, Sequence

import torch
from torch import nn

from vitscale.models.cappa import CapPa
from vitscale.models.clip import CLIP, CLIPVisionConfig, to_open_clip_state_dict
from vitscale.models.vit import VisionTransformer, ViTConfig

__all__ = ["FORMATS", "merge_tensor_parallel", "shard_state_dict", "pipeline_to_whole", "to_timm", "to_open_clip",
           "convert_state_dict", "timm_kwargs", "create_timm_model", "library_config", "check_state_dict",
           "visual_timm_kwargs", "visual_to_timm"]

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
Format = Literal["timm", "open_clip", "vitscale"]
FORMATS: tuple[str, ...] = ("timm", "open_clip", "vitscale")


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """State-dict key -> (the module that owns it, the key's last part), for every key of
    ``model.state_dict()`` (persistent buffers included)."""
    keys = set(model.state_dict(keep_vars=True))
    owners = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for leaf, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            key = f"{mod_name}.{leaf}" if mod_name else leaf
            if key in keys:
                owners[key] = (mod, leaf)
    return owners


def merge_tensor_parallel(shards: Sequence[Mapping[str, torch.Tensor]], model_part: nn.Module,
                          atol: float = 0.0) -> StateDict:
    """The tensor ranks' state dicts of one module -> the state dict of the unsharded module.

    Column-parallel weights and biases are put back row block by row block (for qkv,
    ``chunks=3``: each rank's q, k and v heads back into the q, k and v blocks);
    row-parallel weights are concatenated along the input features; everything else is
    replicated and taken from rank 0.

    Args:
        shards: ``shards[r]`` is tensor rank r's state dict of ``model_part``.
        model_part: the module as sharded for training (``parallelize_vit(m, 0, world,
            None)`` on a meta-built model is enough: only its structure is read). Its keys
            are the shards' keys.
        atol: replicated tensors must agree across ranks within this (they receive
            identical gradients); a larger difference is logged as a warning.

    Returns:
        The merged state dict, keyed as ``model_part``'s.

    Raises:
        ValueError: when the number of shards or any key or shape does not fit ``model_part``.
    """
    if not shards:
        raise ValueError("merge_tensor_parallel: no shards given")
    owners = _owners(model_part)
    for rank, shard in enumerate(shards):
        missing, unexpected = sorted(set(owners) - set(shard)), sorted(set(shard) - set(owners))
        if missing or unexpected:
            raise ValueError(f"tensor rank {rank}'s state dict does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    merged: StateDict = {}
    for key, (mod, leaf) in owners.items():
        parts = [shard[key] for shard in shards]
        sharded = hasattr(mod, "is_sharded") and mod.is_sharded(leaf)
        if sharded and len(parts) != mod.world:
            raise ValueError(f"{key} is sharded over {mod.world} tensor ranks but {len(parts)} shards were given")
        if sharded:
            merged[key] = mod.merge(leaf, parts)
        else:
            first = parts[0]
            for rank, other in enumerate(parts[1:], start=1):
                if other.shape != first.shape:
                    raise ValueError(f"replicated {key}: tensor rank {rank} has shape {tuple(other.shape)}, "
                                     f"rank 0 {tuple(first.shape)}")
                if first.is_floating_point() and not torch.allclose(other, first, rtol=0.0, atol=atol):
                    logger.warning("replicated %s differs between tensor ranks 0 and %d by up to %.3g; "
                                   "keeping rank 0's", key, rank, (other - first).abs().max().item())
            merged[key] = first
        if sharded:
            expect = tuple(mod.full_shape(leaf))
            if tuple(merged[key].shape) != expect:
                raise ValueError(f"{key}: merged shape {tuple(merged[key].shape)} is not the full layer's {expect}")
    return merged


def whole_name(key: str, prefix: str, layer_prefixes: Sequence[str] | None) -> str:
    """The name in the whole model of ``key`` of a model piece named ``prefix`` (a ``PipelineModule``:
    its children are named by layer index, ``layer_prefixes`` gives each layer's name)."""
    if layer_prefixes is not None:  # a PipelineModule: its children are named by layer index
        index, _, rest = key.partition(".")
        prefix = layer_prefixes[int(index)]
        key = rest
    return f"{prefix}.{key}" if prefix else key


def shard_state_dict(full: Mapping[str, torch.Tensor], model_part: nn.Module, prefix: str = "",
                     layer_prefixes: Sequence[str] | None = None) -> StateDict:
    """A whole-model state dict -> the state dict of one piece of the model (the reverse of
    ``merge_tensor_parallel`` / ``pipeline_to_whole``), ready for ``model_part.load_state_dict``.

    The piece may be a tensor-parallel shard (its ``ColumnParallelLinear`` /
    ``RowParallelLinear`` modules take their slices with their own ``shard()``), a
    pipeline layer or stage, or both.

    Args:
        full: the whole model's state dict (our names, e.g. from ``vitscale-export --to vitscale``).
        model_part: the piece, e.g. a model after ``parallelize_vit``, one layer of
            ``pipeline.vit_layers``, or a ``PipelineModule`` stage.
        prefix: ``model_part``'s name in the whole model (``"blocks.3"`` for a block; ``""``
            for the whole model or a ViTEmbed / ViTHead layer).
        layer_prefixes: for a ``PipelineModule``, whose children are named by layer index:
            each layer's prefix, in layer order (``[p for p, _ in vit_layers(model)]``).

    Returns:
        ``model_part``'s state dict: fresh contiguous tensors, each the slice this piece holds.

    Raises:
        KeyError: when ``full`` lacks a tensor the piece needs.
        ValueError: when a slice's shape does not fit the piece.
    """
    out: StateDict = {}
    for key, (mod, leaf) in _owners(model_part).items():
        name = whole_name(key, prefix, layer_prefixes)
        if name not in full:
            raise KeyError(f"the whole-model state dict has no {name!r} (needed for {key!r} of the model piece)")
        value = full[name]
        if hasattr(mod, "shard"):
            value = mod.shard(leaf, value)
        local = getattr(mod, leaf)
        if tuple(value.shape) != tuple(local.shape):
            raise ValueError(f"{name}: {tuple(full[name].shape)} in the state dict gives a slice of shape "
                             f"{tuple(value.shape)}, the model piece holds {tuple(local.shape)}")
        out[key] = value.detach().clone().contiguous()
    return out


def pipeline_to_whole(layers: Mapping[int, Mapping[str, torch.Tensor]], layer_prefixes: Sequence[str]) -> StateDict:
    """Pipeline layers' state dicts (as DeepSpeed writes them, one file per layer) -> one
    state dict with whole-model names.

    Args:
        layers: layer index -> that layer's state dict (keys relative to the layer).
        layer_prefixes: each layer's name prefix in the whole model, in layer order
            (``pipeline.vit_layers``: ``""`` for the embedding and head, ``"blocks.N"``).

    Returns:
        The union, keys prefixed; a key two layers both hold (tied weights) must agree.
    """
    out: StateDict = {}
    for index in sorted(layers):
        if not 0 <= index < len(layer_prefixes):
            raise ValueError(f"pipeline layer {index} does not exist: the model has {len(layer_prefixes)} layers")
        for key, value in layers[index].items():
            name = whole_name(key, layer_prefixes[index], None)
            if name in out and not torch.equal(out[name], value):
                raise ValueError(f"{name} appears in two pipeline layers with different values")
            out[name] = value
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, what: str = "state dict") -> None:
    """Raise ``ValueError`` naming the keys and shapes when ``state`` does not fit ``model``
    (which may be on the meta device)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatch {shapes[:3]}")


def to_timm(state: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> StateDict:
    """Our ViT's state dict for timm: the names already are timm's (``vit.py``), so this only
    checks that it is a ViT's. Build the timm model with ``timm_kwargs(cfg)``. A CapPa's (``model``
    the CapPa, on the meta device): its image tower, converted by ``visual_to_timm``."""
    if isinstance(model, CapPa):
        return visual_to_timm(state, library_config(model, "timm"))
    if "patch_embed.proj.weight" not in state or any(k.startswith(("visual.", "text.")) for k in state):
        raise ValueError("to_timm: not a ViT state dict (a CLIP exports with --to open_clip)")
    return dict(state)


def to_open_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Our CLIP's state dict -> open_clip's ``CLIP`` names (``clip.to_open_clip_state_dict``)."""
    if "visual.conv1.weight" not in state or "logit_scale" not in state:
        raise ValueError("to_open_clip: not a CLIP state dict (a ViT exports with --to timm)")
    return to_open_clip_state_dict(dict(state))


def convert_state_dict(state: Mapping[str, torch.Tensor], to: Format, model: nn.Module | None = None) -> StateDict:
    """Our whole-model state dict in the naming of ``to``: ``timm`` (a ViT, or a CapPa's image tower:
    pass the ``model``, meta-built), ``open_clip`` (a CLIP) or ``vitscale`` (ours, unchanged:
    ``model.init`` and ``shard_state_dict`` read it)."""
    if to == "timm":
        return to_timm(state, model)
    if to == "open_clip":
        return to_open_clip(state)
    if to == "vitscale":
        return dict(state)
    raise ValueError(f"unknown export format {to!r}; use one of {', '.join(FORMATS)}")


# Options timm's VisionTransformer cannot express: (config field, value that is fine, why).
_NOT_IN_TIMM = [("dual_patchnorm", False, "has no LayerNorm on the pixels before the patch embedding"),
                ("moe_blocks", 0, "has no Soft MoE layer"),
                ("adatape_bank", None, "has no AdaTape tape reader"),
                ("pos_embed", "learned", "has no factorized (row + column) position embedding")]
# Names in timm_kwargs for timm objects that JSON cannot hold; create_timm_model resolves them.
_TIMM_BLOCK = "ParallelScalingBlock(fuse_out_proj=True)"
_TIMM_NORM = "LayerNorm(bias=False)"
_TIMM_CLIP_NORM = "LayerNorm(eps=1e-5)"  # torch's LayerNorm, as open_clip's and timm's own *_clip_* models
_TIMM_QUICK_GELU = "quick_gelu"  # timm's activation name


def timm_kwargs(cfg: ViTConfig) -> dict:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` that build the
    model our ``cfg`` describes (the one our state dict loads into with ``strict=True``).

    JSON-serialisable: a parallel block is named ``block_fn="ParallelScalingBlock(fuse_out_proj=True)"``
    and bias-free norms ``norm_layer="LayerNorm(bias=False)"``; ``create_timm_model`` builds
    the model from these kwargs, resolving both names.

    Raises:
        ValueError: for an option timm's ViT does not have (Dual PatchNorm, Soft MoE,
            factorized position embeddings): export those with ``--to vitscale``.
    """
    for name, plain, why in _NOT_IN_TIMM:
        if getattr(cfg, name) != plain:
            raise ValueError(f"timm's VisionTransformer {why} ({name}={getattr(cfg, name)!r}); export this model "
                             f"with --to vitscale, or train it with {name}={plain!r}")
    kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                  num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
                  depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  qk_norm=cfg.qk_norm, init_values=cfg.init_values, class_token=cfg.class_token,
                  fc_norm=cfg.fc_norm)
    if cfg.parallel_block:
        kwargs["block_fn"] = _TIMM_BLOCK
    if not cfg.norm_bias:
        kwargs["norm_layer"] = _TIMM_NORM
    return kwargs


def create_timm_model(kwargs: dict | ViTConfig) -> nn.Module:
    """timm's ``VisionTransformer`` from ``timm_kwargs`` (or straight from our config)."""
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer as TimmViT

    kwargs = dict(timm_kwargs(kwargs) if isinstance(kwargs, ViTConfig) else kwargs)
    if kwargs.get("block_fn") == _TIMM_BLOCK:
        kwargs["block_fn"] = partial(ParallelScalingBlock, fuse_out_proj=True)
    if kwargs.get("norm_layer") == _TIMM_NORM:
        kwargs["norm_layer"] = partial(LayerNorm, bias=False)
    if kwargs.get("norm_layer") == _TIMM_CLIP_NORM:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=1e-5)
    return TimmViT(**kwargs)


def visual_timm_kwargs(vision: CLIPVisionConfig, out_dim: int, quick_gelu: bool = False) -> dict:
    """timm ``VisionTransformer`` kwargs of a CLIP image tower (as timm's ``vit_*_clip_*`` models:
    ``pre_norm`` for ``ln_pre``, no patch-embedding bias, LayerNorm eps 1e-5, the class token
    pooled after the final norm), its ``proj`` as the head of ``out_dim`` classes (zero bias).

    Raises:
        ValueError: for tower options timm's ViT has not (Dual PatchNorm, Soft MoE, q/k norms).
    """
    if vision.options():
        raise ValueError(f"timm's CLIP-style VisionTransformer has no {', '.join(vision.options())}; export "
                         "this model with --to vitscale")
    kwargs = dict(img_size=vision.image_size, patch_size=vision.patch_size, in_chans=3, num_classes=out_dim,
                  global_pool="token", embed_dim=vision.width, depth=vision.layers, num_heads=vision.heads,
                  mlp_ratio=vision.mlp_ratio, qkv_bias=True, class_token=True, pre_norm=True, fc_norm=False,
                  norm_layer=_TIMM_CLIP_NORM)
    if quick_gelu:
        kwargs["act_layer"] = _TIMM_QUICK_GELU
    return kwargs


def visual_to_timm(state: Mapping[str, torch.Tensor], kwargs: dict) -> StateDict:
    """A CLIP / CapPa image tower (the ``visual.*`` keys of ``state``) -> timm's ``VisionTransformer``
    built from ``kwargs`` (``visual_timm_kwargs``): renamed to open_clip's names, then converted by
    timm's own open_clip loader (``checkpoint_filter_fn``: conv1 -> patch_embed.proj, ln_pre ->
    norm_pre, ln_post -> norm, proj -> head, transposed), so timm, not we, decides its names."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if "visual.conv1.weight" not in visual:
        raise ValueError("visual_to_timm: the state dict has no image tower (visual.*)")
    with torch.device("meta"):
        model = create_timm_model(kwargs)
    return dict(checkpoint_filter_fn(to_open_clip_state_dict(visual), model))


def library_config(model: nn.Module, to: Format) -> dict:
    """What the target library needs to rebuild ``model``: timm's ``VisionTransformer`` kwargs,
    open_clip's model-config JSON (``CLIP(**cfg)``), or nothing for ``vitscale``."""
    if to == "timm" and isinstance(model, VisionTransformer):
        return timm_kwargs(model.cfg)
    if to == "timm" and isinstance(model, CapPa):  # its image tower
        return visual_timm_kwargs(model.cfg.vision, model.cfg.decoder.width, model.cfg.quick_gelu)
    if to == "open_clip" and isinstance(model, CLIP):
        if model.cfg.vision.options():
            raise ValueError(f"open_clip's image tower has no {', '.join(model.cfg.vision.options())}; export this "
                             "CLIP with --to vitscale")
        return model.cfg.to_dict()
    return {}
