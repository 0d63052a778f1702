"""The weights the ranks of a tensor-parallel group hold alike, checked.

Tensor parallelism (``models/tensor_parallel.py``) shards the blocks' linears; every other
parameter (norms, patch / token and position embeddings, class token, heads, projections, a CLIP's
logit scale and bias, Soft MoE experts) is replicated on each tensor rank and must stay identical:
the ranks receive identical gradients and take identical optimizer steps. A replica that drifts
(a gradient reduced over the wrong group, a rank-dependent update, a rank that loaded other
weights) trains another function than the single-process model, silently. So at each log step the
ranks compare a checksum of every replicated tensor, as they compare the keys of the batch they
read (``train/batches.py``'s ``check_tensor_peers``), and a mismatch stops the run naming the tensors.

The checksum is exact: each tensor's bits (as integers) weighted by position and summed modulo
2**64, so any changed element, and any two swapped ones, change it; integer sums do not depend
on the order of summation, so it is the same on every rank for the same bits.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vitscale.models.interop import whole_name

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_PERIOD = 65521  # position weights 1 .. 65521 (a prime): swapped elements change the sum


def replicated_parameters(module: nn.Module, layer_prefixes: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(whole-model name, this rank's tensor)`` of every parameter not sharded over the tensor
    ranks (not marked ``tensor_model_parallel``), in the module's order (the same on every tensor
    rank of a stage). Under ZeRO-3 the tensor is the part of this rank's partition that holds
    elements (``_zero3_elements``), which the tensor peers of a data rank also hold alike."""
    return [(whole_name(name, "", layer_prefixes), _zero3_elements(p) if hasattr(p, "ds_tensor") else p)
            for name, p in module.named_parameters() if not getattr(p, "tensor_model_parallel", False)]


def _zero3_elements(param: nn.Parameter) -> torch.Tensor:
    """The elements of a ZeRO-3 parameter this data rank holds, without the partition's padding: data
    rank d holds elements [d * n, (d + 1) * n) of the flattened parameter (n = the partition size),
    padded past the end with values nobody wrote (e.g. all of a 1-element logit scale's partition on
    data rank 1), which differ between tensor ranks and must not be compared."""
    part = param.ds_tensor
    rank = dist.get_rank(group=param.ds_process_group)
    valid = max(0, min(part.numel(), param.ds_numel - rank * part.numel()))
    return part.reshape(-1)[:valid]


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """An int64 scalar of the tensor's exact bits (see the module docstring)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_floating_point() or flat.is_complex():
        flat = flat.view(_BITS[flat.element_size()])
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % _PERIOD + 1
    return (flat.to(torch.int64) * weights).sum()


def check_replicated_weights(module: nn.Module, group, device, layer_prefixes: Sequence[str] | None = None) -> None:
    """Collective over a tensor-parallel group: every rank's replicated parameters must be bitwise
    equal to the other ranks'; raise, naming the tensors that differ and the ranks, if not.

    Args:
        module: this rank's model (a tensor shard, or a pipeline stage of one).
        group: the tensor-parallel group (``ParallelDims.tensor_group()``).
        device: where the checksums are exchanged (the collective's device).
        layer_prefixes: for a ``PipelineModule``, each layer's name in the whole model (for the message).

    Raises:
        RuntimeError: naming the replicated tensors whose values differ between tensor ranks.
    """
    named = replicated_parameters(module, layer_prefixes)
    mine = torch.stack([checksum(t) for _, t in named]).to(device) if named else \
        torch.zeros(0, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(named)], dtype=torch.int64, device=device), group=group)
    if len({int(c) for c in counts}) > 1:
        raise RuntimeError(f"the ranks of a tensor-parallel group hold different numbers of replicated parameters "
                           f"({[int(c) for c in counts]}): they were built from different models or layouts")
    peers = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(peers, mine, group=group)
    peers = torch.stack(peers).cpu()  # (tensor ranks, tensors)
    differ = (peers != peers[0]).any(dim=0).nonzero().flatten().tolist()
    if differ:
        ranks = {i: sorted({r for r in range(world) if peers[r, i] != peers[0, i]}) for i in differ}
        names = ", ".join(f"{named[i][0]} (tensor rank 0 vs {ranks[i]})" for i in differ[:10])
        more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
        raise RuntimeError(f"replicated weights differ between the ranks of a tensor-parallel group: {names}{more}. "
                           "Tensor ranks hold these whole and must update them identically; the run no longer "
                           "trains the single-process function (a gradient reduced over the wrong group, a "
                           "rank-dependent update, or different starting weights)")
