"""Model + optimizer + ``deepspeed.initialize`` for a given layout."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from vitscale.config import Config, model_kwargs
from vitscale.models import create_model
from vitscale.train.finetune import load_initial_weights

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def build_model(cfg: Config) -> nn.Module:
    """The full (unsharded) model, initialised from ``train.seed`` identically on every rank."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, **model_kwargs(cfg))
    if cfg.model.init:
        load_initial_weights(model, cfg.model.init)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (all 1-D tensors), position embeddings
    and the class token, as in timm and the DeiT / FDSL recipes."""
    skip = set(getattr(model, "no_weight_decay", lambda: {"pos_embed", "cls_token"})())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, dims, ds_config: dict):
    """``deepspeed.initialize`` on the model, with our grid as ``mpu``.

    Args:
        cfg: the experiment.
        dims: ``ParallelDims`` from ``vitscale.distributed.init_distributed``.
        ds_config: from ``vitscale.config.compose_ds_config``.

    Returns:
        The DeepSpeed engine (its ``.module`` is the model).
    """
    import deepspeed

    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if dims.is_main:
        logger.info("model %s: %.2fM parameters, ZeRO-%d, %s", cfg.model.name, n_params / 1e6,
                    cfg.parallel.zero, cfg.train.precision)
    o, t = cfg.optim, cfg.train

    def schedule(optimizer):  # DeepSpeed calls it with the optimizer it built
        ratio = lambda i: lr_lambda(i, t.steps, o.warmup_steps, o.schedule, o.warmup_init_ratio,  # noqa: E731
                                    o.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)

    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=dims.grid, lr_scheduler=schedule,
                                           model_parameters=param_groups(model, o.weight_decay))
    return engine


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


def grad_norm_fp32(model: nn.Module) -> float:
    """Global 2-norm of the (already data-parallel averaged) gradients.

    DeepSpeed reports the norm for its ZeRO / bf16 / fp16 optimizers but not for
    plain fp32 without ZeRO, so we compute it there, before the step clears them.
    """
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
