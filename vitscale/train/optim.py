"""What DeepSpeed's optimizer is handed: AdamW parameter groups (weight decay, layer-wise LR decay),
the warm-up + cosine LR schedule, the gradient norm and clipping where DeepSpeed's own is wrong;
around its step, the clamp of parameters that live in an interval (a CLIP's logit scale); and
this rank's fp32 master copy of a parameter, wherever the optimizer keeps it.

The optimizer itself is DeepSpeed's (``ds_config["optimizer"]``, composed in ``vitscale.config``)
where DeepSpeed has a kernel for the run, timm's otherwise (``client_optimizer``); its state lives wherever the ZeRO stage puts it. Where the module trains in bf16 / fp16, or under
ZeRO 1-3, the optimizer steps an fp32 master copy of each parameter and copies it into the module
after the step; a parameter changed only in the module is overwritten at the next step, so the
clamp and resharding write both (``master_views``, ``set_master_``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from torch import nn
from torch._utils import _unflatten_dense_tensors

from vitscale.config.deepspeed import OptimizerSection
from vitscale.models.interop import whole_name


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


def client_optimizer(section: OptimizerSection, groups: list[dict], device_type: str) -> torch.optim.Optimizer | None:
    """timm's Lion / LAMB for ``optim.name`` where DeepSpeed has no kernel for this run, else None (the
    engine builds DeepSpeed's from the config's optimizer section; with ours, the caller hands
    ``deepspeed.initialize`` ``with_client_optimizer(ds_config)``).

    DeepSpeed's ``FusedLion`` and ``FusedLamb`` are CUDA kernels; its CPU Lion runs only for ZeRO-Offload,
    and ``FusedLamb`` only under fp16's dynamic loss scale (``_do_sanity_check``), where the engine wraps it
    in ``FP16_UnfusedOptimizer``, which keeps whole parameters as LAMB needs. Elsewhere timm's
    implementations (the same update rules, per parameter) run as DeepSpeed's client optimizer.
    """
    params = section.params
    if section.kind == "Lion" and not (device_type == "cuda" or section.offload):
        from timm.optim import Lion

        return Lion(groups, lr=params["lr"], betas=tuple(params["betas"]), weight_decay=params["weight_decay"])
    if section.kind == "Lamb":
        if section.fp16:
            if device_type != "cuda":
                raise ValueError("optim.name=lamb with train.precision=fp16 runs DeepSpeed's FusedLamb, a CUDA "
                                 f"kernel; this device is {device_type}: set train.precision=fp32")
            return None
        from timm.optim import Lamb

        # max_grad_norm=None: the gradient is clipped once, by DeepSpeed / clip_in_step (optim.grad_clip).
        return Lamb(groups, lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                    weight_decay=params["weight_decay"], bias_correction=params.get("bias_correction", True),
                    max_grad_norm=None)
    return None


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


def _zero0_master(optimizer, param: nn.Parameter) -> torch.Tensor | None:
    """``param``'s fp32 copy in DeepSpeed's ZeRO-0 fp16 / bf16 optimizer (``FP16_Optimizer``: flat fp32
    groups; the unfused one: a tensor per parameter), or None."""
    for i, group in enumerate(getattr(optimizer, "fp16_groups", None) or []):
        for j, p in enumerate(group):
            if p is param and hasattr(optimizer, "fp32_groups_flat"):
                return _unflatten_dense_tensors(optimizer.fp32_groups_flat[i], group)[j]  # views
            if p is param and hasattr(optimizer, "fp32_groups"):
                return optimizer.fp32_groups[i][j]
    return None


def zero0_master_order(optimizer, module: nn.Module) -> list[list[list]] | None:
    """``[name, shape]`` (``module``'s name) of each parameter in each fp32 group of DeepSpeed's ZeRO-0
    fp16 / bf16 optimizer, in the order its flat buffers hold them; None for any other optimizer.
    DeepSpeed records this (``param_shapes``) for its ZeRO and BF16 optimizers but not for this one,
    so checkpoints record it themselves (``checkpoint.save``) to read the master weights back."""
    groups = getattr(optimizer, "fp16_groups", None)
    if groups is None or not (hasattr(optimizer, "fp32_groups_flat") or hasattr(optimizer, "fp32_groups")):
        return None
    names = {id(p): name for name, p in module.named_parameters()}
    return [[[names[id(p)], list(p.shape)] for p in group] for group in groups]


def master_views(optimizer, param: nn.Parameter) -> list[torch.Tensor]:
    """This rank's part of ``param``'s fp32 master copy as tensors to read and change in place:
    its fragment of the flat partition (ZeRO 1/2 and DeepSpeed's BF16_Optimizer, i.e. bf16 ZeRO-1 and
    bf16 pipelines), its slice of the tensor (ZeRO 0 fp16 / bf16). [] where the optimizer steps the
    module's parameter itself (fp32, ZeRO 0) or this rank holds no part of it. ZeRO-3 partitions:
    ``deepspeed.utils.safe_get_local_fp32_param`` (they may be swapped out; see ``clamp_master_``)."""
    mapping = getattr(param, "_hp_mapping", None)  # DeepSpeed's link from a parameter to its fp32 fragment
    if mapping is not None:
        return [mapping.get_hp_fragment()]
    if hasattr(param, "_hp_mapping"):
        return []  # linked, but the fragment lives on other data ranks
    view = _zero0_master(optimizer, param)
    return [view] if view is not None else []


@torch.no_grad()
def clamp_master_(optimizer, param: nn.Parameter, low: float, high: float) -> None:
    """Clamp ``param`` to [low, high] in place: the module's copy (under ZeRO-3 this rank's partition)
    and this rank's part of the fp32 master copy. Elementwise, so every rank clamps what it holds
    and no collective is needed."""
    getattr(param, "ds_tensor", param).data.clamp_(low, high)
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None:
            safe_set_local_fp32_param(param, local.clamp(low, high))
        return
    for view in master_views(optimizer, param):
        view.clamp_(low, high)


@torch.no_grad()
def set_master_(optimizer, param: nn.Parameter, value: torch.Tensor) -> None:
    """Write the full fp32 ``value`` of ``param`` into this rank's part of its fp32 master copy
    (nothing where the module's parameter is the master: load that with ``load_state_dict``)."""
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3, BF16_Optimizer
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.detach().to(torch.float32))  # only the part this rank holds
        return
    view = _zero0_master(optimizer, param)
    if view is not None:
        view.copy_(value.detach().reshape(view.shape))


def clamp_in_step(engine, model: nn.Module, bounds: dict[str, tuple[float, float]],
                  layer_prefixes: list[str] | None = None) -> list[str]:
    """After each optimizer step, clamp the parameters named in ``bounds`` (whole-model names:
    ``ModelSpec.clamped``, e.g. a CLIP's ``logit_scale`` in [0, log 100]) in the module and in the
    optimizer's fp32 master copy, as open_clip_train clamps ``logit_scale`` after ``optimizer.step()``.
    A parameter, not the loss, is clamped: a clamp inside the loss would zero its gradient.

    Args:
        engine: the DeepSpeed engine; its ``optimizer.step`` is wrapped (after ``clip_in_step``'s, if any).
        model: this rank's model (a pipeline stage: only the stage holding the parameter clamps).
        bounds: whole-model name -> (low, high).
        layer_prefixes: for a ``PipelineModule``, each layer's name in the whole model.

    Returns:
        The whole-model names of the parameters this rank clamps ([]: the step is left as it is).
    """
    targets = [(whole_name(name, "", layer_prefixes), p) for name, p in model.named_parameters()]
    targets = [(name, p, bounds[name]) for name, p in targets if name in bounds]
    if not targets:
        return []
    step = engine.optimizer.step

    def step_then_clamp(*args, **kwargs):
        out = step(*args, **kwargs)
        for _, param, (low, high) in targets:
            clamp_master_(engine.optimizer, param, low, high)
        return out

    engine.optimizer.step = step_then_clamp
    return [name for name, _, _ in targets]
