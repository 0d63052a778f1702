"""Tensor-parallel ViT on 2 gloo processes against the unsharded model: same weights,
same outputs, and every sharded gradient equal to the slice of the unsharded gradient."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.conftest import run_in_gloo
from vitscale.models import create_model
from vitscale.models.tensor_parallel import (ColumnParallelLinear, gather_from_tensor_parallel,
                                             parallelize_vit)
from vitscale.models.vit import init_weights

pytestmark = pytest.mark.distributed

KW = dict(img_size=32, depth=2, num_heads=4, num_classes=5, qk_norm=True, init_values=0.1)
WORLD = 2


def _full(seed: int, **options):
    return init_weights(create_model("vit_tiny_patch16", **{**KW, **options}), seed)


def _sharded(seed: int, rank: int, **options):
    with torch.device("meta"):
        model = create_model("vit_tiny_patch16", **{**KW, **options})
    parallelize_vit(model, rank, WORLD, dist.group.WORLD)
    model.to_empty(device="cpu")
    return init_weights(model, seed)


def _assert_shards_match(full, tp) -> int:
    """Same outputs, and every parameter and gradient of ``tp`` the slice of ``full``'s;
    returns how many parameters are sharded."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    out_full, out_tp = full(x), tp(x)
    torch.testing.assert_close(out_tp, out_full, rtol=1e-5, atol=1e-6)
    F.cross_entropy(out_full, labels).backward()
    F.cross_entropy(out_tp, labels).backward()

    full_params = dict(full.named_parameters())
    modules = dict(tp.named_modules())
    sharded = 0
    for name, p in tp.named_parameters():
        owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        owner = modules[owner_name]
        ref, ref_grad = full_params[name].detach(), full_params[name].grad
        if hasattr(owner, "shard"):
            ref, ref_grad = owner.shard(leaf, ref), owner.shard(leaf, ref_grad)
            sharded += p.numel() < full_params[name].numel()
            assert getattr(p, "tensor_model_parallel") == owner.is_sharded(leaf)
        assert p.shape == ref.shape, name
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=0, msg=f"init of {name}")
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    return sharded


def _check(rank: int, world: int):
    full, tp = _full(7), _sharded(7, rank)
    sharded = _assert_shards_match(full, tp)
    assert sharded == 6 * KW["depth"]  # qkv w+b, fc1 w+b, proj w, fc2 w per block (row biases are whole)
    assert tp.blocks[0].attn.num_heads == 2

    # gather: forward concatenates the shards, backward hands each rank its slice
    part = torch.full((2, 3), float(rank), requires_grad=True)
    whole = gather_from_tensor_parallel(part, dist.group.WORLD)
    assert whole.shape == (2, 6) and whole[:, 3:].eq(1).all() and whole[:, :3].eq(0).all()
    (whole * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(part.grad, torch.arange(6.0)[3 * rank:3 * rank + 3].expand(2, 3))


# The architecture options of issue 11 under tensor parallelism: the ViT-22B block (fused
# projections, bias-free QKV and norms, per-head norms), Dual PatchNorm, Soft MoE (experts
# replicated on the tensor ranks).
OPTIONS = [dict(parallel_block=True, qkv_bias=False, norm_bias=False, dual_patchnorm=True),
           dict(parallel_block=True, qk_norm=False),
           dict(moe_blocks=1, moe_experts=3, moe_slots=2)]


def _count_all_reduces(block, x) -> int:
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        block(x).sum().backward()
    finally:
        dist.all_reduce = original
    return len(calls)


def _check_options(rank: int, world: int):
    for options in OPTIONS:
        _assert_shards_match(_full(5, **options), _sharded(5, rank, **options))
    # One all-reduce per parallel block forward and one backward; two each for a sequential block.
    x = torch.randn(2, 5, 192)
    counts = {p: _count_all_reduces(_sharded(5, rank, qk_norm=False, parallel_block=p).blocks[0], x)
              for p in (False, True)}
    assert counts == {False: 4, True: 2}, counts


def _check_clip_options(rank: int, world: int):
    from vitscale.models.clip import clip_init_weights

    vision = dict(qk_norm=True, dual_patchnorm=True, moe_blocks=1, moe_experts=3)
    full = create_model("clip_tiny", vision=vision)
    clip_init_weights(full, full.cfg, 5)
    with torch.device("meta"):
        tp = create_model("clip_tiny", vision=vision)
    parallelize_vit(tp, rank, WORLD, dist.group.WORLD)
    tp.to_empty(device="cpu")
    clip_init_weights(tp, tp.cfg, 5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 999, (2, 16), generator=torch.Generator().manual_seed(1))
    for got, want in zip(tp(images, tokens), full(images, tokens)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_clip_image_tower_options_shard_exactly():
    run_in_gloo(_check_clip_options, WORLD)


def test_architecture_options_shard_exactly_and_parallel_blocks_halve_the_all_reduces():
    run_in_gloo(_check_options, WORLD)


def test_tensor_parallel_vit_matches_unsharded_model():
    run_in_gloo(_check, WORLD)


def test_init_is_independent_of_what_else_is_built():
    # A block initialises to the same values alone (as a pipeline stage builds it) as in the whole model.
    whole = _full(3)
    with torch.device("meta"):
        alone = create_model("vit_tiny_patch16", **KW).blocks[1]
    alone.to_empty(device="cpu")
    init_weights(alone, 3, prefix="blocks.1")
    for (name, a), (_, b) in zip(alone.named_parameters(), whole.blocks[1].named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(_full(4).blocks[1].attn.qkv.weight, whole.blocks[1].attn.qkv.weight)


def test_column_parallel_qkv_takes_each_ranks_heads_of_q_k_and_v():
    layer = ColumnParallelLinear(4, 12, True, rank=1, world=2, group=None, chunks=3)
    full = torch.arange(12.0)[:, None].expand(12, 4)  # row i holds i
    rows = layer.shard("weight", full)[:, 0].tolist()
    assert rows == [2.0, 3.0, 6.0, 7.0, 10.0, 11.0]  # second half of q, of k, of v
