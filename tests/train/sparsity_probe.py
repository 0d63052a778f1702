"""A probe (tests/train/layouts.py ``"call"``) that trains a 2:4-sparse run and, at every step boundary,
checks what the rank holds: each block weight (its tensor shard) keeps exactly 2 non-zeros in every
group of 4 along the input dimension, and the optimizer's fp32 master copy of it holds the same values
(a master left dense would refill the pruned weights at the next step)."""
import re

import torch

from vitscale.train.loop import train
from vitscale.train.optim import master_views

_BLOCK_WEIGHT = re.compile(r"(^|\.)(attn\.(qkv|proj)|mlp\.fc[12])\.weight$")  # a pipeline stage names blocks by layer index


def _check(run) -> int:
    checked = 0
    for name, weight in run.engine.module.named_parameters():
        if not _BLOCK_WEIGHT.search(name):
            continue
        groups = (weight.detach().reshape(weight.shape[0], -1, 4) != 0).sum(-1)
        step = run.engine.global_steps
        assert (groups <= 2).all(), f"step {step}: {name} has a group of 4 with {int(groups.max())} non-zeros"
        assert (groups == 2).float().mean() > 0.99, f"step {step}: {name} lost kept weights"
        for view in master_views(run.engine.optimizer, weight):
            address = weight._hp_mapping.lp_fragment_address
            module_piece = weight.detach().flatten().narrow(0, address.start, address.numel)
            assert torch.equal(view.reshape(-1), module_piece), f"step {step}: {name}'s master copy is not the masked weight"
            checked += 1
        checked += 1
    return checked


def check_nm_after_every_step(run) -> None:
    steps_checked = []
    original = run.steps.train_batch

    def train_batch_then_check(*args, **kwargs):
        loss = original(*args, **kwargs)
        if run.engine.global_steps >= run.cfg.model.sparsity.dense_warmup:
            assert _check(run) >= 4, "too few block weights found"
        steps_checked.append(run.engine.global_steps)
        return loss

    run.steps.train_batch = train_batch_then_check
    dense_warmup = run.cfg.model.sparsity.dense_warmup
    if dense_warmup == 0:
        _check(run)  # before the first step too: the initial weights are masked
    else:  # dense until then
        assert all((p != 0).all() for n, p in run.engine.module.named_parameters() if _BLOCK_WEIGHT.search(n))
    train(run)
    assert steps_checked == list(range(1, run.cfg.train.steps + 1)), steps_checked
