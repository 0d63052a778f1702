"""Parallelism applied to a built model from outside, as torchtitan's ``parallelize_*`` functions do:
tensor parallelism (``tensor_parallel.py``: Megatron column / row sharding of every block),
pipeline stages (``pipeline.py``: the model's layers as a DeepSpeed ``PipelineModule``),
activation checkpointing, torch.compile of each block (``compile_blocks``); and the checks, run before any process starts, that a layout fits a model.

The model classes (``vit.py``, ``clip.py``) know none of this: they are single-device modules, built
on the meta device here, split, and only then materialised and initialised, each parameter from
(seed, its name in the whole model), so every layout starts from the same function.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from vitscale.config.schema import ConfigError
from vitscale.models.cappa import DecoderBlock, cappa_init_weights, cappa_layers
from vitscale.models.clip import clip_init_weights
from vitscale.models.flops import layer_flops
from vitscale.models.spec import ModelSpec
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.models.vit import Block, ParallelBlock, init_weights

if TYPE_CHECKING:  # the process groups come from vitscale.distributed; models never create any
    from vitscale.distributed import ParallelDims


def check_layout(spec: ModelSpec, tensor: int, pipe: int) -> None:
    """Raise ConfigError unless ``parallel.tensor`` splits every stack's heads and MLP width and
    ``parallel.pipe`` has a block for each stage."""
    for stack in spec.stacks:
        if stack.heads % tensor:
            ok = [k for k in range(1, stack.heads + 1) if stack.heads % k == 0]
            raise ConfigError(f"parallel.tensor={tensor} must divide the {stack.heads} attention heads of "
                              f"{stack.where}{spec.name}; use one of {', '.join(map(str, ok))}")
        if stack.mlp_hidden % tensor:
            raise ConfigError(f"parallel.tensor={tensor} must divide the MLP width {stack.mlp_hidden} of "
                              f"{stack.where}{spec.name}")
    if spec.kind == "cappa" and pipe > 1:
        raise ConfigError(f"CapPa under parallel.pipe>1 is not supported yet (parallel.pipe={pipe}): the pipeline "
                          "layers pass one image and one text stream between stages, and every decoder block needs the "
                          "image tower's output tokens besides its own; use parallel.pipe=1 with tensor and ZeRO")
    blocks = sum(stack.blocks for stack in spec.stacks)
    if pipe > blocks:
        raise ConfigError(f"parallel.pipe={pipe} is more stages than the {blocks} blocks of {spec.name}; "
                          f"use parallel.pipe <= {blocks}")


def pipeline_takes_noise(spec: ModelSpec) -> bool:
    """Whether the model's pipeline stages pass the samples' noise keys along (``models/noise.py``):
    a ViT's do (its dropout and drop-path draw keyed masks in every stage); a CLIP's towers have no
    stochastic layers, so its stages pass (image, text, end-of-text positions) only."""
    return spec.kind == "classifier"


def stage_tensors(spec: ModelSpec) -> int:
    """Float tensors one pipeline stage sends the next: a CLIP's stages pass image and text activations."""
    return 2 if spec.kind == "clip" else 1


def pipeline_layers(spec: ModelSpec) -> list[tuple[str, nn.Module]]:
    """The model as ``(name prefix in the whole model, layer)`` pairs on the meta device: the layers a
    pipeline is made of, in order (what checkpoints of pipeline runs are keyed by)."""
    if spec.kind == "cappa":  # no pipeline runs it yet: its layers as one would cut them (the planner's counts)
        return cappa_layers(spec.meta())
    from vitscale.models.pipeline import clip_layers, vit_layers

    return (clip_layers if spec.kind == "clip" else vit_layers)(spec.meta())


def layer_prefixes(spec: ModelSpec) -> list[str]:
    """Each pipeline layer's name prefix in the whole model, in layer order."""
    return [prefix for prefix, _ in pipeline_layers(spec)]


def stage_flops(spec: ModelSpec, pipe: int, partition: str = "blocks") -> list[int]:
    """Forward FLOPs per sample of each pipeline stage (one entry for ``pipe`` = 1): the layers
    ``partition`` gives each stage, counted by ``flops.layer_flops``; they sum to the model's."""
    if pipe == 1:
        return [spec.forward_flops()]
    from vitscale.models.pipeline import stage_bounds

    layers = pipeline_layers(spec)
    per_layer = layer_flops(spec.arch)
    if len(per_layer) != len(layers):
        raise RuntimeError(f"{spec.name}: {len(per_layer)} layer FLOP counts for {len(layers)} pipeline layers")
    bounds = stage_bounds([layer for _, layer in layers], pipe, partition)
    return [sum(per_layer[bounds[s]:bounds[s + 1]]) for s in range(pipe)]


def parallelize(spec: ModelSpec, dims: ParallelDims | None, seed: int, loss_fn: Callable | None = None,
                partition: str = "blocks", activation_checkpoint: int = 0) -> nn.Module:
    """This rank's part of the model, materialised and initialised as the single-process model is.

    Args:
        spec: the model.
        dims: this process's place in the layout; None: the whole model on the CPU.
        seed: the weights' seed (``train.seed``).
        loss_fn: a pipeline computes it on its last stage.
        partition: how layers split over pipeline stages (``pipeline.PARTITIONS``).
        activation_checkpoint: recompute activations in chunks of this many blocks; 0 = off.

    Returns:
        pipe = tensor = 1: the whole model. tensor > 1: every block's linears sharded over the
        tensor ranks (both CLIP towers alike; a CapPa decoder's cross-attention too). pipe > 1: this rank's stage as a ``PipelineModule``.
        No process ever holds more than its share.
    """
    model = spec.meta()
    device = dims.device if dims is not None else torch.device("cpu")
    shard = None
    if dims is not None and dims.tensor > 1:
        shard = partial(parallelize_vit, rank=dims.tensor_rank, world=dims.tensor, group=dims.tensor_group())
    if dims is not None and dims.pipe > 1:
        from vitscale.models.pipeline import build_clip_pipeline, build_vit_pipeline

        build = build_clip_pipeline if spec.kind == "clip" else build_vit_pipeline
        return build(model, dims.grid._topo, dims.stage, seed, loss_fn, device, partition, activation_checkpoint,
                     shard)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    if spec.kind == "clip":
        clip_init_weights(model, model.cfg, seed)
    elif spec.kind == "cappa":
        cappa_init_weights(model, model.cfg, seed)
    else:
        init_weights(model, seed)
    model.set_grad_checkpointing(activation_checkpoint)
    return model


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every transformer block of this rank's part of the model in place (regional
    compilation, as torchtitan applies it: the names, state dict and hooks around each block stay; the
    embedding, heads and losses stay eager). Returns the number of blocks compiled.

    Blocks differ only in their weights and in Python numbers: a block's noise ``site`` (``models/noise.py``)
    and its drop-path rate. Dynamo would specialise every compiled block on its own numbers and recompile
    for each, up to its recompile limit (8), then run the rest eagerly; with ints on modules left
    unspecialised (floats are by default) the blocks share their graphs.
    """
    import torch._dynamo

    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    blocks = [m for m in model.modules() if isinstance(m, (Block, ParallelBlock, DecoderBlock))]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
