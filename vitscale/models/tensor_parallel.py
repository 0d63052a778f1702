"""Megatron-style tensor parallelism (Shoeybi et al. 2019), applied to a built model.

A transformer block needs two collectives per sub-layer: the first linear is split by
output features (``ColumnParallelLinear``: each rank computes some heads / some MLP
hidden units), the second by input features (``RowParallelLinear``: each rank adds its
partial product, then one all-reduce). In between everything is local.

    x ──copy_to──▶ [qkv / fc1: column shard] ──▶ attention / GELU (local) ──▶
       [proj / fc2: row shard] ──reduce_from──▶ + bias ──▶ y  (identical on every rank)

``copy_to`` is the identity forward and an all-reduce of the input gradient backward;
``reduce_from`` the reverse. Everything outside the blocks (patch embedding, norms,
head) stays replicated and gets identical gradients on every tensor rank, so nothing
else needs a collective.

DeepSpeed has no tensor-parallel layers of its own for training (its AutoTP targets
inference), so these are ours; the process group is DeepSpeed's slice-parallel group of
the shared ``PipelineParallelGrid``. Sharded parameters carry
``tensor_model_parallel = True``: DeepSpeed's gradient-norm and overflow code then counts
them on every tensor rank and the replicated ones only on tensor rank 0.

Weights are sharded from the full layer's initialisation (``shard`` / ``full_shape``,
used by ``vitscale.models.vit.init_weights``), so every tensor layout starts from the
same function as the single-process model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitscale.models.moe import SoftMoE
from vitscale.models.vit import HeadSlice, ParallelBlock

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SharedLayerNorm", "ShardedParallelBlock",
           "copy_to_tensor_parallel", "reduce_from_tensor_parallel", "gather_from_tensor_parallel", "parallelize_vit"]


class _CopyToTensorParallel(torch.autograd.Function):
    """Forward: identity. Backward: sum the input gradients of all tensor ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Forward: sum the partial outputs of all tensor ranks. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallel(torch.autograd.Function):
    """Forward: concatenate the ranks' shards along the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromTensorParallel.apply(x, group)


def _chunk_sizes(chunks: int | tuple[int, ...], features: int, world: int, what: str) -> tuple[int, ...]:
    sizes = (features // chunks,) * chunks if isinstance(chunks, int) else tuple(chunks)
    if sum(sizes) != features or any(size % world for size in sizes):
        raise ValueError(f"{what} {features} do not split into blocks {list(sizes)} each divisible by "
                         f"{world} tensor ranks")
    return sizes


def _shard_chunks(full: torch.Tensor, sizes: tuple[int, ...], rank: int, world: int, dim: int) -> torch.Tensor:
    # Each rank holds its 1/world of every block, blocks in order.
    return torch.cat([block.chunk(world, dim=dim)[rank] for block in full.split(list(sizes), dim=dim)], dim=dim)


def _merge_chunks(parts: list[torch.Tensor], sizes: tuple[int, ...], world: int, dim: int) -> torch.Tensor:
    local = [size // world for size in sizes]
    pieces = [part.split(local, dim=dim) for part in parts]  # pieces[rank][block]
    return torch.cat([pieces[rank][block] for block in range(len(sizes)) for rank in range(world)], dim=dim)


class _ShardedLinear(nn.Module):
    """Shared bookkeeping: the full layer's shape and which slice this rank holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, world: int, group):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # of the full layer
        self.rank, self.world, self.group = rank, world, group
        self._has_bias = bias

    def _mark(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            p.tensor_model_parallel = name in self._sharded

    def _apply(self, fn, recurse=True):
        # Moving or materialising (``to``, ``to_empty``) can replace the Parameter objects
        # and with them the attribute DeepSpeed reads: set it again.
        out = super()._apply(fn, recurse)
        self._mark()
        return out

    def full_shape(self, name: str) -> tuple[int, ...]:
        """Shape of parameter ``name`` in the unsharded layer."""
        return (self.out_features, self.in_features) if name == "weight" else (self.out_features,)

    def is_sharded(self, name: str) -> bool:
        return name in self._sharded

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self._has_bias}, "
                f"shard={self.rank}/{self.world}")


class ColumnParallelLinear(_ShardedLinear):
    """``nn.Linear`` split by output features; the output stays sharded.

    Args:
        in_features, out_features: of the full layer.
        bias: whether the layer has a bias (sharded with the outputs).
        rank, world, group: this rank's index in, the size of, and the tensor-parallel group.
        chunks: the output is ``chunks`` equal blocks that are each split, e.g. 3 for a
            fused qkv whose rows are (q heads, k heads, v heads): each rank gets its heads of
            q, k and v, not a contiguous third of the rows. Or a tuple of block sizes, e.g.
            (MLP hidden, D, D, D) for a parallel block's fused input projection.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, world: int, group,
                 chunks: int | tuple[int, ...] = 1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, rank, world, group)
        self.chunks = _chunk_sizes(chunks, out_features, world, "column-parallel linear: output features")
        local = out_features // world
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        self._sharded = ("weight", "bias")
        self._mark()

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full parameter ``name``: its rows of every chunk."""
        return _shard_chunks(full, self.chunks, self.rank, self.world, dim=0)

    def merge(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``shard``: the ranks' slices -> the full parameter."""
        return _merge_chunks(parts, self.chunks, self.world, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """``nn.Linear`` split by input features: takes a sharded input, returns the full,
    summed output (identical on every rank). The bias is replicated and added once, after
    the reduction. ``chunks`` as for ``ColumnParallelLinear``, over the input features
    (a parallel block's fused output projection reads (attention, MLP hidden))."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, world: int, group,
                 chunks: int | tuple[int, ...] = 1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, rank, world, group)
        self.chunks = _chunk_sizes(chunks, in_features, world, "row-parallel linear: input features")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._sharded = ("weight",)  # the bias is replicated: counted once in gradient norms
        self._mark()

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return _shard_chunks(full, self.chunks, self.rank, self.world, dim=1) if name == "weight" else full

    def merge(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return _merge_chunks(parts, self.chunks, self.world, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tensor_parallel(F.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class SharedLayerNorm(nn.LayerNorm):
    """A replicated LayerNorm applied to different data on each tensor rank (the per-head
    q/k norms of ViT-22B: each rank normalises its own heads). Its gradient is the sum
    over ranks, so the parameters enter through ``copy_to_tensor_parallel``."""

    def __init__(self, norm: nn.LayerNorm, group):
        super().__init__(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                         bias=norm.bias is not None, device=norm.weight.device, dtype=norm.weight.dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tensor_parallel(self.weight, self.group) if self.weight is not None else None
        bias = copy_to_tensor_parallel(self.bias, self.group) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def _column(linear: nn.Linear, rank: int, world: int, group, chunks=1) -> ColumnParallelLinear:
    w = linear.weight
    return ColumnParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, rank, world,
                                group, chunks=chunks, device=w.device, dtype=w.dtype)


def _row(linear: nn.Linear, rank: int, world: int, group, chunks=1) -> RowParallelLinear:
    w = linear.weight
    return RowParallelLinear(linear.in_features, linear.out_features, linear.bias is not None, rank, world,
                             group, chunks=chunks, device=w.device, dtype=w.dtype)


class ShardedParallelBlock(ParallelBlock):
    """A ``vit.ParallelBlock`` whose own ``mlp_bias`` (timm's name, present when the fused
    input projection has no bias) is split with the MLP hidden units it belongs to; its
    linears are Column/RowParallelLinear. An existing block is re-classed, so parameter
    names stay the model's."""

    @property
    def world(self) -> int:
        return self.tp_world

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.mlp_hidden_full,)

    def is_sharded(self, name: str) -> bool:
        return name == "mlp_bias"

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.tp_world)[self.tp_rank]

    def merge(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # see _ShardedLinear._apply
        if self.mlp_bias is not None:
            self.mlp_bias.tensor_model_parallel = True
        return out


def _parallelize_parallel_block(block: ParallelBlock, rank: int, world: int, group) -> None:
    # One column split of [MLP hidden, q, k, v] and one row split of [attention, MLP hidden]:
    # the block's only collectives are copy_to before in_proj and reduce_from after out_proj.
    dim = block.num_heads * block.head_dim
    hidden = block.in_proj.out_features - 3 * dim
    block.in_proj = _column(block.in_proj, rank, world, group, chunks=(hidden, dim, dim, dim))
    block.out_proj = _row(block.out_proj, rank, world, group, chunks=(dim, hidden))
    block.num_heads //= world
    # Keyed dropout masks (models/noise.py) index the whole tensor: say which slice this rank holds.
    block.heads = HeadSlice(rank * block.num_heads, block.num_heads * world)
    block.mlp_drop.tensor_slice = (rank * (hidden // world), hidden)
    _share_qk_norms(block, group)
    block.__class__ = ShardedParallelBlock
    block.mlp_hidden_full, block.tp_rank, block.tp_world = hidden, rank, world
    if block.mlp_bias is not None:
        local = block.mlp_bias.detach()[:hidden // world]  # the right shape; values come from init / load
        block.mlp_bias = nn.Parameter(torch.empty_like(local))
        block.mlp_bias.tensor_model_parallel = True


def _share_qk_norms(module: nn.Module, group) -> None:
    for name in ("q_norm", "k_norm"):
        if isinstance(getattr(module, name), nn.LayerNorm):
            setattr(module, name, SharedLayerNorm(getattr(module, name), group))


def parallelize_vit(model: nn.Module, rank: int, world: int, group) -> nn.Module:
    """Shard every transformer block of ``model`` over ``world`` tensor ranks, in place.

    qkv and fc1 become column-parallel (heads / hidden units split), proj and fc2
    row-parallel (a CapPa decoder block's cross-attention: q and kv column-parallel, proj
    row-parallel); each attention keeps ``num_heads / world`` heads, and per-head q/k norms
    sum their gradients over the ranks (``SharedLayerNorm``). A ``vit.ParallelBlock`` splits
    its fused input projection (MLP hidden, q, k, v) by columns and its fused output
    projection (attention, MLP hidden) by rows: one all-reduce forward, one backward. Soft
    MoE experts are not split: each tensor rank runs all of them on identical slots.
    Works on any module
    that contains ``vitscale.models.vit.Block``-shaped blocks (a whole ViT, a pipeline
    stage, one block). The new layers are created on the old weights' device with
    uninitialised values: build on the meta device, parallelize, then materialise with
    ``vitscale.models.vit.init_weights``, which fills full weights and slices them.

    Returns:
        ``model``.
    """
    if world == 1:
        return model
    for module in list(model.modules()):
        if isinstance(module, ParallelBlock):
            _check_heads(module.num_heads, world)
            _parallelize_parallel_block(module, rank, world, group)
            continue
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if attn is None or mlp is None:
            continue
        _check_heads(attn.num_heads, world)
        attn.qkv = _column(attn.qkv, rank, world, group, chunks=3)
        attn.proj = _row(attn.proj, rank, world, group)
        attn.num_heads //= world
        attn.heads = HeadSlice(rank * attn.num_heads, attn.num_heads * world)  # for keyed attention dropout
        _share_qk_norms(attn, group)
        cross = getattr(module, "cross_attn", None)  # a CapPa decoder block: q, kv and proj split by heads too
        if cross is not None:
            cross.q = _column(cross.q, rank, world, group)
            cross.kv = _column(cross.kv, rank, world, group, chunks=2)  # rows (k heads, v heads)
            cross.proj = _row(cross.proj, rank, world, group)
            cross.num_heads //= world
            cross.heads = HeadSlice(rank * cross.num_heads, cross.num_heads * world)
        if isinstance(mlp, SoftMoE):
            continue  # experts stay whole on every tensor rank (identical inputs, identical gradients)
        hidden = mlp.fc1.out_features
        mlp.fc1 = _column(mlp.fc1, rank, world, group)
        mlp.fc2 = _row(mlp.fc2, rank, world, group)
        mlp.drop1.tensor_slice = (rank * (hidden // world), hidden)  # keyed dropout of this rank's hidden units
    return model


def _check_heads(heads: int, world: int) -> None:
    if heads % world:
        raise ValueError(f"{heads} attention heads do not split over tensor={world} ranks")
