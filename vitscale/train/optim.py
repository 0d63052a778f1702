"""What DeepSpeed's optimizer is handed: AdamW parameter groups (weight decay, layer-wise LR decay),
the warm-up + cosine LR schedule, and the gradient norm and clipping where DeepSpeed's own is wrong.

The optimizer itself is DeepSpeed's (``ds_config["optimizer"]``, composed in ``vitscale.config``);
its state lives wherever the ZeRO stage puts it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (all 1-D tensors) and the parameters in
    ``skip`` (default: the model's ``no_weight_decay()``: position embeddings, class token,
    ...), as in timm / open_clip and the DeiT / FDSL recipes. Names are those of the whole
    model; a pipeline stage's ``"<layer index>."`` prefix is ignored."""
    if skip is None:
        skip = set(getattr(model, "no_weight_decay", lambda: {"pos_embed", "cls_token"})())
    piped = isinstance(model, PipelineModule)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = name.split(".", 1)[1] if piped else name
            (no_decay if p.ndim <= 1 or whole in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float,
                       skip: set[str]) -> list[dict]:
    """timm's ``param_groups_layer_decay`` (BEiT / DeiT fine-tuning): block ``i`` of ``L`` trains at
    ``lr * layer_decay ** (L + 1 - i)``, the embeddings lowest, the head at ``lr``; weight decay as in
    ``param_groups``. timm writes the factor as ``lr_scale`` for its own schedulers; ours is a
    ``LambdaLR`` over each group's initial lr, so the factor goes into each group's ``lr``."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
        group.pop("param_names", None)
    return groups


def lr_lambda(i: int, steps: int, warmup: int, schedule: str = "cosine", init_ratio: float = 0.0,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for step ``i + 1`` (``i`` steps done).

    Linear warm-up reaches the peak at step ``warmup``; cosine then decays to
    ``min_ratio`` at the last step (``constant`` stays at the peak).
    """
    if i < warmup:
        return init_ratio + (1.0 - init_ratio) * (i + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (i + 1 - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(steps: int, warmup: int, schedule: str = "cosine", init_ratio: float = 0.0,
                min_ratio: float = 0.0) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """The ``lr_scheduler`` argument of ``deepspeed.initialize``: DeepSpeed calls it with the optimizer
    it built. Ours rather than DeepSpeed's ``WarmupCosineLR``, which runs its first two steps at lr 0
    and never applies the peak lr itself; DeepSpeed still checkpoints its state."""
    def schedule_of(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: lr_lambda(i, steps, warmup, schedule, init_ratio, min_ratio))

    return schedule_of


def grad_norm_fp32(model: nn.Module, dims=None) -> float:
    """Global 2-norm of the (already data-parallel averaged) gradients.

    DeepSpeed reports the norm for its ZeRO / bf16 / fp16 optimizers but not for
    plain fp32 without ZeRO, so we compute it there, before the step clears them.
    With pipe or tensor > 1 each rank holds part of the model: squares are summed over
    the model-parallel group, counting tensor-sharded parameters on every tensor rank and
    replicated ones once (DeepSpeed's own rule).
    """
    first = dims is None or dims.tensor_rank == 0
    squares = [p.grad.detach().float().square().sum() for p in model.parameters()
               if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False))]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=getattr(dims, "device", "cpu"))
    if dims is not None and dims.pipe * dims.tensor > 1:
        dist.all_reduce(total, group=dims.model_group())
    return total.sqrt().item()


def clip_in_step(engine, model: nn.Module, dims, max_norm: float) -> None:
    """Compute the global gradient norm (and clip to ``max_norm`` > 0) right before each
    optimizer step, where DeepSpeed's own fp32 clipping miscounts pipeline stages (see
    ``vitscale.config.compose_ds_config``). The norm is kept as ``engine.vitscale_grad_norm``
    for the logs. Same arithmetic as DeepSpeed's: scale by max_norm / (norm + 1e-6) when below 1."""
    step = engine.optimizer.step

    def clipped_step(*args, **kwargs):
        norm = grad_norm_fp32(model, dims)
        engine.vitscale_grad_norm = norm
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
        return step(*args, **kwargs)

    engine.optimizer.step = clipped_step
