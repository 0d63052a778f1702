"""What the ranks of a tensor-parallel group must hold alike, checked at log steps: the replicated
weights (train/replicas.py) and the batch they read (train/batches.py's check_tensor_peers). Both
failure paths, in one 2-process gloo spawn; the passing path runs at every log step of every
tensor-parallel layout (tests/train/test_parallel.py, tests/train/test_clip_siglip.py)."""
import gc

import pytest
import torch
import torch.distributed as dist

from tests.conftest import run_in_gloo
from vitscale.models.clip import clip_config, clip_init_weights, CLIP
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.train.batches import check_tensor_peers
from vitscale.train.replicas import check_replicated_weights, checksum, replicated_parameters

pytestmark = pytest.mark.distributed


def _tensor_shard(rank: int, world: int) -> CLIP:
    cfg = clip_config("clip_tiny", init_logit_bias=-10.0)
    with torch.device("meta"):
        model = CLIP(cfg)
    parallelize_vit(model, rank, world, dist.group.WORLD)
    model.to_empty(device="cpu")
    return clip_init_weights(model, cfg, seed=3)


def _raises(fn, *parts: str) -> str:
    try:
        fn()
    except RuntimeError as e:
        for part in parts:
            assert part in str(e), str(e)
        return str(e)
    raise AssertionError(f"no error; expected one naming {parts}")


def _check_replicas(rank: int, world: int, group, cpu) -> None:
    model = _tensor_shard(rank, world)
    names = [name for name, _ in replicated_parameters(model)]
    assert {"logit_scale", "logit_bias", "visual.conv1.weight", "visual.ln_pre.weight", "text.token_embedding.weight",
            "text.positional_embedding", "visual.proj", "visual.blocks.0.norm1.weight",
            "visual.blocks.0.attn.proj.bias"} <= set(names)
    assert not any(n.endswith(("attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight")) for n in names)  # sharded
    check_replicated_weights(model, group, cpu)  # identical replicas, different shards: passes

    # One element of one replicated tensor one ulp off on rank 1: every rank stops, naming it.
    with torch.no_grad():
        if rank == 1:
            w = model.visual.ln_pre.weight
            w[5] = torch.nextafter(w[5], torch.tensor(2.0))
    _raises(lambda: check_replicated_weights(model, group, cpu), "visual.ln_pre.weight (tensor rank 0 vs [1])")
    with torch.no_grad():
        if rank == 1:
            model.visual.ln_pre.weight[5] = 1.0
            model.logit_bias.add_(1.0)
    message = _raises(lambda: check_replicated_weights(model, group, cpu), "logit_bias")
    assert "ln_pre" not in message
    with torch.no_grad():
        model.logit_bias.fill_(-10.0)
    check_replicated_weights(model, group, cpu)


def _check(rank: int, world: int) -> None:
    group, cpu = dist.group.WORLD, torch.device("cpu")
    _check_replicas(rank, world, group, cpu)
    # The shards hold the process group: collect them before the worker destroys it, or a rank's
    # gloo threads may outlive it and abort the process at exit (seen in 1 of 5 runs without this).
    gc.collect()

    # Swapped elements change the checksum too (position-weighted).
    t = torch.arange(6, dtype=torch.float32)
    assert checksum(t) != checksum(t[[1, 0, 2, 3, 4, 5]]) and checksum(t) == checksum(t.clone())

    # The batch check: equal key checksums pass, different ones stop the run.
    check_tensor_peers(12345, group, cpu)
    _raises(lambda: check_tensor_peers(1000 + rank, group, cpu), "read different batches", "[1000, 1001]")


def test_tensor_ranks_stop_on_replicas_or_batches_that_differ():
    run_in_gloo(_check, 2)
