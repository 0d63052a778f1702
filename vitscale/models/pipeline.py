"""A ViT as a list of layers for ``deepspeed.pipe.PipelineModule``.

The layers are the model's own pieces, in order: the embedding (patches, class token,
position embedding), each transformer block, and the head (final norm, pooling,
classifier). Between layers only one float tensor travels, the tokens (B, N, D), which
is what DeepSpeed's pipeline engine can send between stages.

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
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils
from torch import nn

from vitscale.models.vit import Block, VisionTransformer, init_weights

__all__ = ["ViTEmbed", "ViTHead", "vit_layers", "stage_bounds", "build_vit_pipeline", "PARTITIONS"]

# How blocks are spread over stages: 'blocks' gives every stage the same number of
# transformer blocks (the embedding and head ride with the first and last stage), which
# is what balances compute for a ViT; 'parameters' balances parameter counts (DeepSpeed's
# default); 'uniform' the number of layers.
PARTITIONS = ("blocks", "parameters", "uniform")


class ViTEmbed(nn.Module):
    """First layer: images (B, C, H, W) -> tokens (B, N, D). Holds the parameters under
    their names in the whole model and runs ``VisionTransformer.embed`` on them."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.cfg = model.cfg
        self.patch_embed, self.cls_token, self.pos_embed = model.patch_embed, model.cls_token, model.pos_embed
        self.pos_drop = model.pos_drop

    forward = VisionTransformer.embed


class ViTHead(nn.Module):
    """Last layer: tokens -> final norm -> pooling -> logits (``VisionTransformer.forward_head``)."""

    def __init__(self, model: VisionTransformer):
        super().__init__()
        self.cfg = model.cfg
        self.norm, self.fc_norm, self.head_drop, self.head = model.norm, model.fc_norm, model.head_drop, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return VisionTransformer.forward_head(self, self.norm(x))


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
        weights = [int(isinstance(layer, Block)) for layer in layers]
    else:
        raise ValueError(f"unknown pipeline partition {method!r}; use one of {', '.join(PARTITIONS)}")
    return ds_utils.partition_balanced(weights=weights, num_parts=stages)


def _ds_method(method: str) -> str:
    return "type:Block" if method == "blocks" else method


def build_vit_pipeline(model: VisionTransformer, topology, stage: int, seed: int, loss_fn: Callable,
                       device: torch.device, partition: str = "blocks", checkpoint_every: int = 0,
                       shard: Callable[[nn.Module], nn.Module] | None = None) -> PipelineModule:
    """This rank's stage of ``model`` as a ``PipelineModule``.

    Args:
        model: the ViT, built on the meta device (nothing is allocated for other stages).
        topology: DeepSpeed's ``PipeModelDataParallelTopology`` (shared with the engine).
        stage: this rank's pipeline stage.
        seed: weight seed (``vit.init_weights``): the same seed gives the same weights as
            the single-process model.
        loss_fn: ``(logits, labels) -> loss``, computed on the last stage.
        device: where the stage's parameters live.
        partition: one of ``PARTITIONS``.
        checkpoint_every: recompute activations in chunks of this many layers (0: off).
        shard: applied to each of this stage's layers before materialising (tensor
            parallelism: ``tensor_parallel.parallelize_vit`` with this rank's group).
    """
    named = vit_layers(model)
    layers = [layer for _, layer in named]
    bounds = stage_bounds(layers, topology.get_dim("pipe"), partition)
    for prefix, layer in named[bounds[stage]:bounds[stage + 1]]:
        if shard is not None:
            shard(layer)
        layer.to_empty(device=device)
        init_weights(layer, seed, prefix)
    module = PipelineModule(layers=layers, topology=topology, loss_fn=loss_fn, partition_method=_ds_method(partition),
                            activation_checkpoint_interval=checkpoint_every,
                            checkpointable_layers=["Block"] if checkpoint_every else None)
    if list(module.parts) != list(bounds):  # our materialised layers must be the ones DeepSpeed keeps
        raise RuntimeError(f"pipeline partition mismatch: DeepSpeed chose {module.parts}, we built {bounds}")
    return module
