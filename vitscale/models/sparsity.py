"""Weight sparsity of the blocks' linear layers, applied to a built model from outside (as
``parallelize.py`` applies tensor parallelism): which layers, their magnitude masks, and the
check that a layout can hold a pattern.

Two patterns (the sparsity scaling-law work, Frantar et al. 2023, "Scaling Laws for Sparsely-Connected
Foundation Models"):

- ``n:m`` (e.g. 2:4, the pattern sparse tensor cores run): in every ``m`` consecutive weights along
  the input dimension (the last axis of an (out, in) weight) the ``n`` largest in magnitude are kept.
- ``unstructured``: the weights of each matrix below its ``target`` quantile of magnitude are zeroed
  (one threshold per matrix: Zhu & Gupta 2017's layer-wise uniform sparsity), raised on their cubic
  schedule (``target_sparsity``).

The layers are every linear inside a transformer block (``blocks.N.``): qkv, proj, fc1, fc2, a parallel
block's fused in / out projections, in both towers of a CLIP; embeddings, heads and Soft MoE experts
stay dense. A tensor shard holds its slice of each mask: n:m groups never straddle shards (the
layout check asks each row-parallel shard's input width to be a multiple of m), and an unstructured
threshold is computed over the whole matrix (its shards gathered over the tensor group), so every
layout masks exactly the weights one process masks.

Ours rather than ``torch.ao.pruning`` / ``torch.nn.utils.prune``: those re-parametrise the module
(``weight_orig`` + ``weight_mask``), which renames the parameters timm / open_clip names, DeepSpeed's
checkpoints and our tensor shards are keyed by; here the mask is applied to the weights in place and
the parameter names stay the model's.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vitscale.config.schema import ConfigError
from vitscale.models.interop import whole_name
from vitscale.models.spec import ModelSpec
from vitscale.models.tensor_parallel import ColumnParallelLinear, RowParallelLinear, parallelize_vit

__all__ = ["parse_pattern", "sparse_linears", "nm_mask", "magnitude_mask", "target_sparsity", "check_sparsity"]

_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.")
_LINEARS = (nn.Linear, ColumnParallelLinear, RowParallelLinear)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> None. Raises ValueError for anything else."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"model.sparsity.pattern={pattern!r} must be 'n:m' with 0 < n < m (e.g. '2:4') or "
                         "'unstructured'")
    return int(match[1]), int(match[2])


def sparse_linears(model: nn.Module, layer_prefixes: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The linear layers sparsity applies to, as (name in the whole model, module), in model order.

    Args:
        model: a whole model, a tensor shard of it, or a ``PipelineModule`` stage.
        layer_prefixes: for a ``PipelineModule``, each layer's name in the whole model.
    """
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, _LINEARS):
            continue
        whole = whole_name(name, "", layer_prefixes)
        if _BLOCK.search(whole) and ".moe." not in whole:
            out.append((whole, module))
    return out


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest-magnitude weights of every ``m`` consecutive ones along the last axis.

    Args:
        weight: (out, in) with ``in`` a multiple of ``m``.

    Returns:
        A bool mask of ``weight``'s shape with exactly ``n`` True in every group.
    """
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"an {n}:{m} mask needs the input width {in_features} to be a multiple of {m}")
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)
    keep = groups.topk(n, dim=-1).indices  # ties: topk's own order, the same on every rank for the same values
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(out_features, in_features)


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float, group=None) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of a whole matrix.

    Args:
        weight: this rank's piece of the matrix (any shape).
        sparsity: fraction of the whole matrix's weights to zero, in [0, 1).
        group: the tensor-parallel group the matrix is sharded over (None: ``weight`` is the whole
            matrix). The shards' magnitudes are gathered so each rank uses the whole matrix's
            threshold (shards are equal in size, as ``tensor_parallel`` splits them).

    Returns:
        A bool mask of ``weight``'s shape: True where the weight is kept.
    """
    magnitudes = weight.detach().abs().float().flatten()
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(magnitudes) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, magnitudes, group=group)
        whole = torch.cat(parts)
    else:
        whole = magnitudes
    k = int(round(sparsity * whole.numel()))
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = whole.kthvalue(k).values  # the k-th smallest magnitude: it and all below are zeroed
    return weight.detach().abs().float() > threshold


def target_sparsity(step: int, target: float, start_step: int, end_step: int, every: int = 1) -> float:
    """Zhu & Gupta's gradual schedule (2017, "To prune, or not to prune", eq. 1) from 0:
    ``s_t = s_f (1 - (1 - (t - t0) / (t1 - t0)) ** 3)`` for ``t0 <= t <= t1``, 0 before, ``s_f`` after,
    updated every ``every`` steps (between updates the last value holds).

    Args:
        step: optimizer steps done.
        target: the final sparsity ``s_f``.
        start_step, end_step: ``t0`` and ``t1``.
        every: steps between mask updates (``Δt``); ``end_step`` always updates.
    """
    if step < start_step:
        return 0.0
    if step >= end_step:
        return target
    step = start_step + (step - start_step) // every * every
    return target * (1.0 - (1.0 - (step - start_step) / (end_step - start_step)) ** 3)


def check_sparsity(spec: ModelSpec, pattern: str | None, tensor: int) -> None:
    """Raise ConfigError unless every sparsified layer of ``spec``, as ``parallel.tensor`` shards it,
    can hold ``pattern``: an n:m group must lie within one shard, so each row-parallel shard's input
    width (each of its chunks, for a fused projection) and every other layer's input width must be
    a multiple of m."""
    if pattern is None:
        return
    nm = parse_pattern(pattern)
    model = spec.meta()
    if tensor > 1:
        parallelize_vit(model, 0, tensor, None)
    layers = sparse_linears(model)
    if not layers:
        raise ConfigError(f"model.sparsity: {spec.name} has no linear layers in transformer blocks to sparsify")
    if nm is None:
        return
    n, m = nm
    for name, layer in layers:
        widths = ([size // tensor for size in layer.chunks] if isinstance(layer, RowParallelLinear)
                  else [layer.in_features])
        if any(width % m for width in widths):
            where = f" on each of parallel.tensor={tensor} shards" if isinstance(layer, RowParallelLinear) else ""
            raise ConfigError(f"model.sparsity.pattern={n}:{m}: {name} has input width {'+'.join(map(str, widths))}"
                              f"{where}, not a multiple of m={m}, so its groups of {m} would straddle it; choose an m "
                              f"that divides it, a smaller parallel.tensor, or pattern=unstructured")
