"""The DeepSpeed config, composed from the experiment and a preset in ``ds_configs/``: the one place
that builds a DeepSpeed config dict. Batch sizes, precision, ZeRO stage, optimizer and clipping
are stated once (in the experiment YAML) and written into the preset, so the two can never
disagree; a preset that states one of them itself is refused."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from vitscale.config.schema import Config, ConfigError
from vitscale.config.shipped import shipped


def own_clipping(cfg: Config) -> bool:
    """Whether vitscale, not DeepSpeed, clips the gradients of this config (see compose_ds_config)."""
    return cfg.parallel.pipe > 1 and cfg.parallel.zero == 0 and cfg.train.precision == "fp32"


# Keys that the experiment config states; a preset must not state them too.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "optimizer", "scheduler", "gradient_clipping")


def find_preset(name: str) -> Path:
    """A DeepSpeed preset: a path, or a name in ``ds_configs/`` (``zero1`` or ``zero1.json``)."""
    folders = shipped("ds_configs")
    candidates = [Path(name)] + [d / name for d in folders] + [d / f"{name}.json" for d in folders]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.json")})
    raise ConfigError(f"parallel.ds_preset='{name}' not found; choose one of {', '.join(available)} or give a path")


def compose_ds_config(cfg: Config, data_parallel: int, check_batch: bool = True, stage_tensors: int = 1) -> dict:
    """The DeepSpeed config: the preset plus everything the experiment states.

    Args:
        cfg: the experiment.
        data_parallel: number of data-parallel ranks (from ``validate_layout``).
        check_batch: with False, batch sizes are written for ``data_parallel`` without
            checking divisibility (used during the world-size-free validation).
        stage_tensors: float tensors a pipeline stage sends to the next (a CLIP sends two:
            ``vitscale.models.parallelize.stage_tensors``).

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.
    """
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    preset_name = p.ds_preset if p.ds_preset != "auto" else f"zero{p.zero}"
    path = find_preset(preset_name)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed preset {path} is not valid JSON: {e}") from None
    for key in _OWNED_KEYS:
        if key in ds:
            raise ConfigError(f"DeepSpeed preset {path} sets '{key}', which the experiment config owns "
                              f"(train.*, optim.*); remove it from the preset")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", p.zero) != p.zero:
        raise ConfigError(f"parallel.zero={p.zero} but DeepSpeed preset {path.name} is for ZeRO stage "
                          f"{zero['stage']}; set parallel.zero={zero['stage']} or choose another parallel.ds_preset")
    zero["stage"] = p.zero
    if p.offload is not None:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
        if p.offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if p.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if p.zero == 0:
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                raise ConfigError(f"DeepSpeed preset {path.name} offloads ({key}) but parallel.zero=0; "
                                  f"set parallel.zero to 1-3 or parallel.offload=none")

    for name in ("fp16", "bf16"):
        section = ds.setdefault(name, {})
        wanted = t.precision == name
        if section.get("enabled", wanted) != wanted:
            raise ConfigError(f"DeepSpeed preset {path.name} sets {name}.enabled={section['enabled']} but "
                              f"train.precision={t.precision}; precision is set by train.precision only")
        section["enabled"] = wanted
    if t.precision == "fp16":
        ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1, **ds["fp16"]}

    data = max(1, data_parallel)
    ds["train_batch_size"] = t.global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = max(1, t.global_batch // (t.micro_batch * data))
    if check_batch and t.micro_batch * data * ds["gradient_accumulation_steps"] != t.global_batch:
        raise ConfigError("batch sizes do not divide; call validate_layout first")
    # DeepSpeed's fp32 ZeRO-0 clipping (runtime.utils.clip_grad_norm_) counts replicated
    # parameters only where the *model*-parallel rank is 0, and that rank spans pipe x tensor:
    # every stage after the first drops out of the norm. There the engine clips instead
    # (vitscale.train.optim.clip_in_step), with the tensor-rank rule the ZeRO optimizers use.
    ds["gradient_clipping"] = 0.0 if own_clipping(cfg) else o.grad_clip
    if p.pipe > 1 and p.tensor > 1 and stage_tensors > 1:
        # DeepSpeed splits what stages send over the tensor ranks only when a single float
        # tensor travels (runtime/pipe/engine.py asserts it).
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": t.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
        "torch_adam": o.torch_adam}}
    # The LR schedule is ours (vitscale.train.optim.lr_lambda) and handed to
    # deepspeed.initialize: DeepSpeed's WarmupCosineLR runs its first two steps at lr 0
    # and never applies the peak lr itself. DeepSpeed still checkpoints its state.
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; silence DeepSpeed's own step prints
    ds.setdefault("wall_clock_breakdown", False)
    return copy.deepcopy(ds)
