"""This rank's model and its DeepSpeed engine: the model parallelised for the layout
(``models.parallelize``), its starting weights (``model.init``), and ``deepspeed.initialize`` with
our parameter groups, LR schedule and process grid, and what wraps the optimizer step (our
clipping where DeepSpeed's is wrong, the clamp of bounded parameters; ``train/optim.py``)."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from vitscale.config import own_clipping
from vitscale.experiment import Experiment
from vitscale.models.parallelize import layer_prefixes, parallelize
from vitscale.train.initial_weights import load_initial_weights
from vitscale.train.optim import clamp_in_step, clip_in_step, layer_decay_groups, lr_schedule, param_groups

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype activations are computed in for ``train.precision``."""
    return _DTYPES[precision]


def build_model(exp: Experiment, dims=None, loss_fn: Callable | None = None) -> nn.Module:
    """This rank's part of the model with the weights the single-process model has
    (``models.parallelize.parallelize``: the whole model, a tensor shard, or a pipeline stage with
    ``loss_fn`` on its last stage), then ``model.init``'s weights sliced to that part.

    Args:
        exp: the experiment.
        dims: this process's ``ParallelDims``; None: the whole model on the CPU.
        loss_fn: a pipeline's last stage computes it.
    """
    cfg = exp.cfg
    model = parallelize(exp.model, dims, cfg.train.seed, loss_fn, cfg.parallel.partition,
                        cfg.parallel.activation_checkpoint)
    if cfg.model.init:
        if dims is not None and dims.pipe > 1:
            load_initial_weights(model, cfg.model.init, layer_prefixes(exp.model), whole=exp.model.meta())
        else:
            load_initial_weights(model, cfg.model.init)
    return model


def build_engine(exp: Experiment, dims, ds_config: dict, loss_fn: Callable | None = None):
    """``deepspeed.initialize`` on this rank's model, with our grid as ``mpu``.

    Args:
        exp: the experiment.
        dims: ``ParallelDims`` from ``vitscale.distributed.init_distributed``.
        ds_config: from ``vitscale.config.compose_ds_config``.
        loss_fn: the objective (``train/objective.py``); a pipeline computes it on its last stage.

    Returns:
        The DeepSpeed engine (its ``.module`` is the model).
    """
    import deepspeed

    cfg, o, t = exp.cfg, exp.cfg.optim, exp.cfg.train
    if dims.is_main:  # before building: a large model's count should show before its memory is spent
        logger.info("model %s: %s parameters, pipe %d x tensor %d x data %d, ZeRO-%d, %s", cfg.model.name,
                    _human(exp.model.parameters), dims.pipe, dims.tensor, dims.data, cfg.parallel.zero, t.precision)
    model = build_model(exp, dims, loss_fn)
    if dims.is_node_main:
        logger.info("rank %d holds %s parameters", dims.rank, _human(sum(p.numel() for p in model.parameters())))
    skip = set(exp.model.no_weight_decay)  # the whole model's names: every layout decays the same parameters
    groups = (layer_decay_groups(model, o.weight_decay, t.lr, o.layer_decay, skip) if o.layer_decay < 1
              else param_groups(model, o.weight_decay, skip))
    # A PipelineModule brings its own grid (built from the same topology); DeepSpeed
    # refuses a second one as mpu.
    mpu = None if dims.pipe > 1 else dims.grid
    schedule = lr_schedule(t.steps, o.warmup_steps, o.schedule, o.warmup_init_ratio, o.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, lr_scheduler=schedule,
                                           model_parameters=groups)
    if own_clipping(cfg):
        clip_in_step(engine, model, dims, o.grad_clip)
    if exp.model.clamped:  # after the clipped step: e.g. a CLIP's logit scale to [0, log 100], master copy too
        clamp_in_step(engine, model, dict(exp.model.clamped), layer_prefixes(exp.model) if dims.pipe > 1 else None)
    return engine


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
