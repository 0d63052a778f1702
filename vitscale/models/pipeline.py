"""A ViT or a CLIP as a list of layers for ``deepspeed.pipe.PipelineModule``.

The layers are the model's own pieces, in order: the embedding (patches, class token,
position embedding), each transformer block, and the head (final norm, pooling,
classifier). Between a ViT's layers one float tensor travels, the tokens (B, N, D), with
the samples' noise keys (int64 (B,), ``models/noise.py``) riding along, so dropout and
drop-path draw in every stage the masks one process draws: DeepSpeed's pipeline engine sends
a tuple whose tail tensors need no gradient, also when it partitions the first over tensor ranks.

Stages are built without ever holding the whole model: every layer is created on the
meta device, the partition is computed from those shapes, and only this stage's layers
are materialised and initialised by ``vit.init_weights`` under their names in the whole
model. So a pipeline stage starts with exactly the weights it would have in the
single-process model (every layout trains the same function), and a ViT-22B-sized model
never has to fit in one process's memory.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils
from torch import nn

from vitscale.models.clip import CLIP, CLIPBlock, TextTower, VisionTower, clip_init_weights
from vitscale.models.vit import Block, ParallelBlock, VisionTransformer, init_weights

__all__ = ["ViTEmbed", "ViTHead", "vit_layers", "stage_block", "stage_bounds", "build_pipeline", "build_vit_pipeline",
           "PARTITIONS", "CLIPEmbed", "ImageBlock", "TextBlock", "CLIPHead", "clip_layers", "build_clip_pipeline"]

# How blocks are spread over stages: 'blocks' gives every stage the same number of
# transformer blocks (the embedding and head ride with the first and last stage), which
# is what balances compute for a ViT; 'parameters' balances parameter counts (DeepSpeed's
# default); 'uniform' the number of layers.
PARTITIONS = ("blocks", "parameters", "uniform")


class ViTEmbed(nn.Module):
    """First layer: (images (B, C, H, W), noise keys (B,)) -> (tokens (B, N, D), keys). Holds the
    parameters under their names in the whole model and runs ``VisionTransformer.embed`` on them."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.cfg = model.cfg
        self.patch_embed, self.cls_token, self.pos_embed = model.patch_embed, model.cls_token, model.pos_embed
        self.pos_embed_h, self.pos_embed_w = model.pos_embed_h, model.pos_embed_w  # factorized positions
        self.pos_drop = model.pos_drop

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, keys = inputs
        # Contiguous: DeepSpeed's pipeline sends only contiguous tensors between stages, and
        # without a class token to concatenate, the patch tokens keep the conv's transposed strides.
        return VisionTransformer.embed(self, images, keys).contiguous(), keys


class ViTHead(nn.Module):
    """Last layer: (tokens, keys) -> final norm -> pooling -> logits (``VisionTransformer.forward_head``)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.cfg = model.cfg
        self.norm, self.fc_norm, self.head_drop, self.head = model.norm, model.fc_norm, model.head_drop, model.head

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, keys = inputs
        return VisionTransformer.forward_head(self, self.norm(x), noise=keys)


class _StageBlock:
    """Mixed into a ViT block of this stage: it takes and passes on (tokens, noise keys)."""

    def forward(self, inputs):
        x, keys = inputs
        return super().forward(x, None, keys), keys


_STAGE_CLASSES: dict[type, type] = {}


def stage_block(block: nn.Module) -> nn.Module:
    """Re-class a (possibly tensor-sharded) ViT block to take the stage tuple: ``Stage<Class>``,
    a subclass, so parameter names and the 'blocks' partition's class-name match stay."""
    cls = type(block)
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"Stage{cls.__name__}", (_StageBlock, cls), {})
    block.__class__ = _STAGE_CLASSES[cls]
    return block


def vit_layers(model: VisionTransformer) -> list[tuple[str, nn.Module]]:
    """The model as ``(name prefix in the whole model, layer)`` pairs, in forward order.

    The layers share their parameters with ``model`` (build it on the meta device)."""
    layers: list[tuple[str, nn.Module]] = [("", ViTEmbed(model))]
    layers += [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    layers.append(("", ViTHead(model)))
    return layers


def stage_bounds(layers: list[nn.Module], stages: int, method: str) -> list[int]:
    """Layer index where each stage starts (and a final end): what ``PipelineModule`` will
    compute for ``partition_method`` = ``_ds_method(method)``, from the same functions."""
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(layers), num_parts=stages)
    if method == "parameters":
        weights = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    elif method == "blocks":
        weights = [int(isinstance(layer, (Block, ParallelBlock))) for layer in layers]
    else:
        raise ValueError(f"unknown pipeline partition {method!r}; use one of {', '.join(PARTITIONS)}")
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


def _ds_method(method: str) -> str:
    # DeepSpeed matches the regex against class names, case-insensitively: Block, ParallelBlock,
    # ShardedParallelBlock, ImageBlock, TextBlock, never ViTEmbed / ViTHead.
    return "type:Block" if method == "blocks" else method


def build_pipeline(named: list[tuple[str, nn.Module]], topology, stage: int, init: Callable, loss_fn: Callable,
                   device: torch.device, partition: str = "blocks", checkpoint_every: int = 0,
                   checkpointable: list[str] | None = None,
                   shard: Callable[[nn.Module], nn.Module] | None = None,
                   adapt: Callable[[nn.Module], nn.Module] | None = None) -> PipelineModule:
    """This rank's stage of a model given as ``(name prefix, layer)`` pairs built on the meta device.

    Args:
        named: the layers in forward order with their names in the whole model.
        topology: DeepSpeed's ``PipeModelDataParallelTopology`` (shared with the engine).
        stage: this rank's pipeline stage.
        init: ``(layer, prefix) -> None``: initialises a materialised layer as in the whole
            model (``vit.init_weights`` / ``clip.clip_init_weights`` with the run's seed).
        loss_fn: ``(outputs, labels) -> loss``, computed on the last stage.
        device: where the stage's parameters live.
        partition: one of ``PARTITIONS``.
        checkpoint_every: recompute activations in chunks of this many layers (0: off).
        checkpointable: class names of the layers that may be recomputed.
        shard: applied to each of this stage's layers before materialising (tensor
            parallelism: ``tensor_parallel.parallelize_vit`` with this rank's group).
        adapt: applied to each of this stage's layers after ``shard`` (``stage_block``).
    """
    layers = [layer for _, layer in named]
    bounds = stage_bounds(layers, topology.get_dim("pipe"), partition)
    for prefix, layer in named[bounds[stage]:bounds[stage + 1]]:
        if shard is not None:
            shard(layer)
        if adapt is not None:
            adapt(layer)
        layer.to_empty(device=device)
        init(layer, prefix)
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method=_ds_method(partition),
                            activation_checkpoint_interval=checkpoint_every,
                            checkpointable_layers=checkpointable if checkpoint_every else None)
    if list(module.parts) != list(bounds):  # our materialised layers must be the ones DeepSpeed keeps
        raise RuntimeError(f"pipeline partition mismatch: DeepSpeed chose {module.parts}, we built {bounds}")
    return module


def build_vit_pipeline(model: VisionTransformer, topology, stage: int, seed: int, loss_fn: Callable,
                       device: torch.device, partition: str = "blocks", checkpoint_every: int = 0,
                       shard: Callable[[nn.Module], nn.Module] | None = None) -> PipelineModule:
    """This rank's stage of ``model`` (a ViT built on the meta device) as a ``PipelineModule``;
    ``seed`` gives the weights the single-process model has. See ``build_pipeline``."""
    blocks = ["Block", "ParallelBlock", "ShardedParallelBlock"]
    return build_pipeline(vit_layers(model), topology, stage, lambda layer, prefix: init_weights(layer, seed, prefix),
                          loss_fn, device, partition, checkpoint_every, [f"Stage{name}" for name in blocks], shard,
                          lambda layer: stage_block(layer) if isinstance(layer, (Block, ParallelBlock)) else layer)


# ---- CLIP: stages pass (image tokens, text tokens, EOT positions) ----
#
# DeepSpeed's pipeline engine sends only tensors between stages, and every float tensor
# on the wire must receive a gradient: so both towers are embedded in the first layer and
# the tuple (image activations, text activations) travels through every stage, image
# blocks touching the first, text blocks the second; the EOT positions ride along as an
# integer tensor (no gradient needed). The last layer projects, normalises and hands
# (image features, text features, logit scale[, logit bias]) to the contrastive loss.

class _Parts(nn.Module):
    """Holds some of a tower's modules and parameters under their names in the tower."""

    def __init__(self, cfg, **parts):
        super().__init__()
        self.cfg = cfg
        for name, part in parts.items():
            setattr(self, name, part)


class CLIPEmbed(nn.Module):
    """(images, token ids) -> (image tokens, text tokens, EOT positions)."""

    def __init__(self, model: CLIP):
        super().__init__()
        v, t = model.visual, model.text
        self.visual = _Parts(v.cfg, conv1=v.conv1, class_embedding=v.class_embedding,
                             positional_embedding=v.positional_embedding, ln_pre=v.ln_pre,
                             patch_norm_pre=v.patch_norm_pre, patch_norm=v.patch_norm)
        self.text = _Parts(t.cfg, token_embedding=t.token_embedding, positional_embedding=t.positional_embedding)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        images, tokens = inputs
        return (VisionTower.embed(self.visual, images), TextTower.embed(self.text, tokens),
                TextTower.eot_positions(tokens))


class ImageBlock(CLIPBlock):
    """A ``CLIPBlock`` of the image tower applied to the first element of the stage tuple
    (an existing block is re-classed, so its parameter names stay those of the tower)."""

    def forward(self, x):
        return super().forward(x[0]), x[1], x[2]


class TextBlock(CLIPBlock):
    """A ``CLIPBlock`` of the text tower applied to the second element of the stage tuple."""

    def forward(self, x):
        return x[0], super().forward(x[1]), x[2]


class CLIPHead(nn.Module):
    """(image tokens, text tokens, EOT) -> (normalised image features, normalised text features,
    ``logit_scale.exp()``[, ``logit_bias``]), what ``CLIP.forward`` returns."""

    def __init__(self, model: CLIP):
        super().__init__()
        v, t = model.visual, model.text
        self.visual = _Parts(v.cfg, ln_post=v.ln_post, proj=v.proj)
        self.text = _Parts(t.cfg, ln_final=t.ln_final, text_projection=t.text_projection)
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias  # the bias: SigLIP's, or None

    def forward(self, x):
        image = F.normalize(VisionTower.forward_head(self.visual, x[0]), dim=-1)
        text = F.normalize(TextTower.forward_head(self.text, x[1], x[2]), dim=-1)
        out = (image, text, self.logit_scale.exp()[0])
        return out if self.logit_bias is None else (*out, self.logit_bias[0])


def _recast(block: CLIPBlock, cls: type) -> CLIPBlock:
    block.__class__ = cls
    return block


def clip_layers(model: CLIP) -> list[tuple[str, nn.Module]]:
    """The CLIP as ``(name prefix in the whole model, layer)`` pairs: embedding, image blocks,
    text blocks, head. The layers share their parameters with ``model`` (build it on meta)."""
    layers: list[tuple[str, nn.Module]] = [("", CLIPEmbed(model))]
    layers += [(f"visual.blocks.{i}", _recast(b, ImageBlock)) for i, b in enumerate(model.visual.blocks)]
    layers += [(f"text.blocks.{i}", _recast(b, TextBlock)) for i, b in enumerate(model.text.blocks)]
    layers.append(("", CLIPHead(model)))
    return layers


def build_clip_pipeline(model: CLIP, topology, stage: int, seed: int, loss_fn: Callable, device: torch.device,
                        partition: str = "blocks", checkpoint_every: int = 0,
                        shard: Callable[[nn.Module], nn.Module] | None = None) -> PipelineModule:
    """This rank's stage of a CLIP built on the meta device; the 'blocks' partition spreads
    the blocks of both towers evenly over the stages. See ``build_pipeline``."""
    return build_pipeline(clip_layers(model), topology, stage,
                          lambda layer, prefix: clip_init_weights(layer, model.cfg, seed, prefix), loss_fn, device,
                          partition, checkpoint_every, ["ImageBlock", "TextBlock"], shard)
