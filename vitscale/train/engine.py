"""This rank's model and its DeepSpeed engine: the model parallelised for the layout
(``models.parallelize``), its starting weights (``model.init``), and ``deepspeed.initialize`` with
our parameter groups, LR schedule and process grid (``train/optim.py``), its checkpoint loads made
weights-only (``train/safe_load.py``); what wraps the optimizer
step: the skip of NaN / Inf steps where DeepSpeed has none (``train/faults.py``), our clipping where
DeepSpeed's is wrong, the clamp of bounded parameters, the weight-sparsity masks; and a log line of the dtypes DeepSpeed chose."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from vitscale.config.deepspeed import optimizer_of, own_clipping, with_client_optimizer
from vitscale.experiment import Experiment
from vitscale.models.parallelize import compile_blocks, layer_prefixes, parallelize
from vitscale.train.faults import skip_nonfinite_steps
from vitscale.train.initial_weights import load_initial_weights
from vitscale.train.optim import (clamp_in_step, client_optimizer, clip_in_step, layer_decay_groups, lr_schedule,
                                  param_groups)
from vitscale.train.safe_load import safe_deepspeed_loads
from vitscale.train.sparsity import Sparsity, sparsify_in_step

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
            load_initial_weights(model, cfg.model.init, layer_prefixes(exp.model), whole=exp.model.meta(), dims=dims)
        else:
            load_initial_weights(model, cfg.model.init, dims=dims)
    if cfg.train.compile:
        compiled = compile_blocks(model, cfg.train.compile_backend)
        logger.info("torch.compile (%s): %d blocks of this rank, compiled at their first forward",
                    cfg.train.compile_backend, compiled)
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
    from deepspeed.accelerator import get_accelerator

    optimizer = client_optimizer(optimizer_of(ds_config), groups, get_accelerator().device_name())
    if optimizer is not None:  # timm's Lion / LAMB (train/optim.py)
        ds_config = with_client_optimizer(ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, lr_scheduler=schedule,
                                           model_parameters=groups, optimizer=optimizer)
    safe_deepspeed_loads(engine)  # resume unpickles with weights_only=True, as every other load (safe_load.py)
    skip_nonfinite_steps(engine)  # first: our clipping (below) wraps the step that may skip
    if own_clipping(cfg):
        clip_in_step(engine, model, dims, o.grad_clip)
    if exp.model.clamped:  # after the clipped step: e.g. a CLIP's logit scale to [0, log 100], master copy too
        clamp_in_step(engine, model, dict(exp.model.clamped), layer_prefixes(exp.model) if dims.pipe > 1 else None)
    # Last, after clip and clamp: the masked weights are zeroed in what the step wrote.
    engine.vitscale_sparsity = _sparsity(exp, dims, engine, model) if cfg.model.sparsity.pattern else None
    if dims.is_main:
        used = precision_in_use(engine)
        logger.info("DeepSpeed optimizer %s: %s weights, %s master weights, gradients accumulated in %s and "
                    "reduced in %s", used["optimizer"], used["weights"], used["master_weights"],
                    used["grad_accum"], used["grad_comm"])
    return engine


def _sparsity(exp: Experiment, dims, engine, model: nn.Module) -> Sparsity:
    """``model.sparsity`` on this rank's layers: the masks of step 0 (``dense_warmup`` 0: from the initial
    weights, module and master copy alike), then after every optimizer step (``train/sparsity.py``)."""
    cfg = exp.cfg
    sparsity = Sparsity(cfg.model.sparsity, cfg.train.steps, model,
                        dims.tensor_group() if dims.tensor > 1 else None,
                        dims.model_group() if dims.pipe * dims.tensor > 1 else None,
                        layer_prefixes(exp.model) if dims.pipe > 1 else None, exp.model.parameters)
    sparsity.update(0)
    sparsity.apply_(engine.optimizer)
    sparsify_in_step(engine, sparsity)
    return sparsity


def precision_in_use(engine) -> dict:
    """What DeepSpeed set up for this rank, read from its objects rather than from the config we
    gave it: the optimizer class it chose (``runtime/engine.py`` ``_configure_optimizer``), the
    dtype of the model's weights, of the weights the optimizer updates (the fp32 master partitions
    of ``BF16_Optimizer`` / ZeRO 1-2 / ZeRO-3), of the buffers gradients accumulate in over micro-batches
    (``BF16_Optimizer``'s ``fp32_groups_gradients_flat``; ZeRO's ``gradient_accumulation_dtype``,
    which sizes its partition buffers; a plain optimizer accumulates in ``param.grad``) and of the
    gradient reduction (``engine.communication_data_type``, which the engine and ZeRO cast to).
    Dtypes are short names (``fp32``, ``bf16``, ``fp16``)."""
    optimizer = engine.optimizer
    weights = next(engine.module.parameters()).dtype
    buffers = getattr(optimizer, "fp32_groups_gradients_flat", None)
    accum = buffers[0].dtype if buffers else getattr(optimizer, "gradient_accumulation_dtype", weights)
    # The fp32 copies the optimizer updates: BF16_Optimizer's, ZeRO 1/2's, ZeRO-3's partitions.
    masters = [t for name in ("fp32_groups_flat_partition", "single_partition_of_fp32_groups",
                              "fp32_partitioned_groups_flat") for t in getattr(optimizer, name, None) or []]
    master = masters[0].dtype if masters else weights  # a plain optimizer updates the weights themselves
    return {"optimizer": type(optimizer).__name__, "weights": dtype_name(weights), "master_weights": dtype_name(master),
            "grad_accum": dtype_name(accum), "grad_comm": dtype_name(engine.communication_data_type)}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``fp32`` (the names ``train.precision`` uses)."""
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
