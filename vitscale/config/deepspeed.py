"""The DeepSpeed config, composed from the experiment and a preset in ``ds_configs/``: the one place
that builds a DeepSpeed config dict. Batch sizes, precision, ZeRO stage, optimizer and clipping
are stated once (in the experiment YAML) and written into the preset, so the two can never
disagree; a preset that states one of them itself is refused."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from vitscale.config.schema import Config, ConfigError
from vitscale.config.shipped import shipped


def own_clipping(cfg: Config) -> bool:
    """Whether vitscale, not DeepSpeed, clips the gradients of this config (see compose_ds_config)."""
    return cfg.parallel.pipe > 1 and cfg.parallel.zero == 0 and cfg.train.precision == "fp32"


# Keys that the experiment config states; a preset must not state them too.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "optimizer", "scheduler", "gradient_clipping", "data_types", "communication_data_type")


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
    unsafe = [f"checkpoint.{k}" for k in ("load_universal", "writer") if (ds.get("checkpoint") or {}).get(k)]
    unsafe += ["datastates_ckpt"] if ds.get("datastates_ckpt") not in (None, False) else []
    if unsafe:  # loaders of their own, not train/safe_load.py's
        raise ConfigError(f"DeepSpeed preset {path} sets {', '.join(unsafe)}: its checkpoint loads bypass vitscale's "
                          "weights-only reader (universal checkpoints unpickle with weights_only=False: a checkpoint "
                          "could run code); remove it (checkpoint.reshard=weights resumes in another layout)")
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
    if t.precision == "bf16":
        _bf16_as_large_stacks_do(ds, cfg, path.name)
    if zero.get("compute_grad_norm", True) is False:
        # ZeRO 1/2 skip a step only through the norm they compute (stage_1_and_2.py step()).
        raise ConfigError(f"DeepSpeed preset {path.name} sets zero_optimization.compute_grad_norm=false: "
                          "ZeRO would then apply a step with NaN / Inf gradients; remove the key")

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
    ds["optimizer"] = optimizer_section(cfg)
    # The LR schedule is ours (vitscale.train.optim.lr_lambda) and handed to
    # deepspeed.initialize: DeepSpeed's WarmupCosineLR runs its first two steps at lr 0
    # and never applies the peak lr itself. DeepSpeed still checkpoints its state.
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; silence DeepSpeed's own step prints
    ds.setdefault("wall_clock_breakdown", False)
    return copy.deepcopy(ds)


# DeepSpeed's optimizer type and the parameters it takes, per optim.name (runtime/engine.py
# _configure_basic_optimizer). train/optim.py builds timm's optimizer with the same parameters
# where DeepSpeed has no kernel for the run (client_optimizer).
OPTIMIZER_TYPES = {"adamw": "AdamW", "lion": "Lion", "lamb": "Lamb"}


def optimizer_section(cfg: Config) -> dict:
    """The DeepSpeed config's ``optimizer`` section for ``optim.*`` and ``train.lr``."""
    o, lr = cfg.optim, cfg.train.lr
    params = {"lr": lr, "betas": list(o.betas), "weight_decay": o.weight_decay}
    if o.name == "adamw":
        params.update(eps=o.eps, torch_adam=o.torch_adam)
    elif o.name == "lamb":  # the clip is ours (gradient_clipping): FusedLamb's own max_grad_norm stays off
        params.update(eps=o.eps, bias_correction=True)
    return {"type": OPTIMIZER_TYPES[o.name], "params": params}


@dataclass(frozen=True)
class OptimizerSection:
    """What the composed DeepSpeed config says of the optimizer, read back for ``train/optim.py``."""

    kind: str  # DeepSpeed's type name: AdamW, Lion, Lamb
    params: dict
    offload: bool  # ZeRO-Offload of the optimizer (DeepSpeed's CPU optimizers)
    fp16: bool


def optimizer_of(ds: dict) -> OptimizerSection:
    """The optimizer section of a composed DeepSpeed config."""
    section = ds.get("optimizer", {})
    return OptimizerSection(kind=section.get("type", ""), params=dict(section.get("params", {})),
                            offload=ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu",
                            fp16=bool(ds.get("fp16", {}).get("enabled", False)))


def zero_settings(ds: dict) -> dict:
    """A composed DeepSpeed config's ZeRO stage and its communication settings where the config
    states them (``overlap_comm``, ``contiguous_gradients``, ``reduce_scatter``, the bucket sizes),
    for the start-up log (``train/fast_path.py``)."""
    zero = ds.get("zero_optimization", {})
    keys = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size",
            "stage3_prefetch_bucket_size")
    return {"stage": zero.get("stage", 0), **{k: zero[k] for k in keys if k in zero}}


def with_client_optimizer(ds: dict) -> dict:
    """The config ``deepspeed.initialize`` gets with an optimizer we built: no optimizer section (DeepSpeed
    would build its own), and ZeRO allowed to step ours on its flat partitions, right for elementwise
    rules (Lion); LAMB, per parameter, never runs under ZeRO (``config/validation.py`` refuses it)."""
    return {**{k: v for k, v in ds.items() if k != "optimizer"}, "zero_allow_untested_optimizer": True}


def _bf16_as_large_stacks_do(ds: dict, cfg: Config, preset: str) -> None:
    """bf16 weights and activations, fp32 gradient accumulation and (by default) fp32 gradient
    reduction, as Megatron-LM (``--accumulate-allreduce-grads-in-fp32``) and torchtitan (FSDP
    ``reduce_dtype=float32``) train in bf16. What DeepSpeed 0.19 does with each key:

    - ``data_types.grad_accum_dtype`` (``runtime/engine.py`` ``get_data_types``; the default is
      the model dtype, bf16) picks the optimizer in ``_do_optimizer_sanity_check``: ZeRO-1 (also
      under a pipeline, and with tensor parallelism) gets ``BF16_Optimizer``
      (``runtime/bf16_optimizer.py``: fp32 gradient buffers ``fp32_groups_gradients_flat``, each
      micro-batch's bf16 gradient added in fp32 by ``_update_hp_grad``, fp32 master weights
      sharded over the data ranks; a pipeline reduces them in ``PipelineEngine._bf16_reduce_grads``);
      ZeRO-2 gets ``DeepSpeedZeroOptimizer(gradient_accumulation_dtype=fp32)``
      (``runtime/zero/stage_1_and_2.py``: each reduced partition is added into an fp32 partition
      buffer, ``_build_compact_grad_partition_buffer``); ZeRO-3 gets
      ``DeepSpeedZeroOptimizer_Stage3`` (``runtime/zero/stage3.py``: reduced partitions are cast
      with ``.to(self.gradient_accumulation_dtype)`` and added into ``grad_partitions_flat_buffer``).
      Without ZeRO DeepSpeed has no fp32 accumulation for bf16 (``_do_optimizer_sanity_check``
      raises ``NotImplementedError: unsupported mix``; without the key it accumulates in bf16):
      ``vitscale.config.validation`` refuses bf16 with ``parallel.zero=0`` before any process starts.
    - ``communication_data_type`` (``runtime/engine.py``, property ``communication_data_type``;
      the default is bf16 when bf16 is on) is the dtype of the gradient reduction:
      ``DeepSpeedEngine.allreduce_bucket`` casts each bucket to it before ``all_reduce`` (this is
      how ``BF16_Optimizer``'s fp32 buffers are reduced, so by default they would be rounded to
      bf16 on the wire), ZeRO 1/2 key their reduction buckets by it (``average_tensor``,
      ``gradient_reduction_w_predivide``), ZeRO-3 casts to it in ``__avg_scatter_contiguous_grads``.
      ``train.grad_comm_dtype`` chooses it (fp32 unless a run trades precision for bandwidth).
    - ``bf16.check_grad_overflow`` (``runtime/precision_config.py``, default true): ZeRO-2 skips a
      step with a NaN / Inf gradient norm only with it (``stage_1_and_2.py`` ``step``); stated
      here so that no preset turns the skip off.
    """
    bf16 = ds["bf16"]
    if bf16.get("check_grad_overflow", True) is not True:
        raise ConfigError(f"DeepSpeed preset {preset} sets bf16.check_grad_overflow="
                          f"{bf16['check_grad_overflow']}: ZeRO-2 would then apply a step with NaN / Inf "
                          "gradients; remove the key")
    bf16["check_grad_overflow"] = True
    ds["data_types"] = {"grad_accum_dtype": "fp32"}
    ds["communication_data_type"] = cfg.train.grad_comm_dtype


def compose_monitor_config(cfg: Config) -> dict:
    """DeepSpeed's monitor sections (``tensorboard``, ``csv_monitor``, ``wandb``; ``deepspeed.monitor.config``)
    for ``log.*``, writing into the run folder: ``run.dir/tensorboard/``, ``run.dir/csv/``.

    They are not put into the dict ``deepspeed.initialize`` gets: the engine would then open its own
    monitor and write ``Train/Samples/*`` every step with the sample count as the step, a second axis
    in the same TensorBoard run (which breaks the purge of a resumed run's steps) and in W&B (which
    drops steps that go back). ``train/monitors.py`` opens DeepSpeed's monitor classes with these
    sections and writes every record of ``metrics.jsonl`` through them (each a ``(tag, value, step)``
    event list, DeepSpeed's interface). Raises ConfigError when a monitor's package is missing.
    """
    from importlib.util import find_spec

    log, folder = cfg.log, cfg.run.dir
    sections: dict = {}
    if log.tensorboard:
        if find_spec("tensorboard") is None:
            raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")
        sections["tensorboard"] = {"enabled": True, "output_path": folder, "job_name": "tensorboard"}
    if log.csv:
        sections["csv_monitor"] = {"enabled": True, "output_path": folder, "job_name": "csv"}
    w = log.wandb
    if w.project is not None:
        if find_spec("wandb") is None:
            raise ConfigError(f"log.wandb.project={w.project} needs the wandb package: pip install 'vitscale[wandb]' "
                              "(or pip install wandb), or leave log.wandb out")
        sections["wandb"] = {"enabled": True, "project": w.project, "team": w.entity, "group": w.group}
    if sections:
        from deepspeed.monitor.config import get_monitor_config

        get_monitor_config(sections)  # DeepSpeed's own check of the sections
    return sections


# DeepSpeed's own defaults where a preset leaves a bucket size out (runtime/zero/config.py,
# runtime/constants.py: 5e8 elements).
_DEFAULT_BUCKET = 500_000_000


def communication_buckets(cfg: Config) -> dict[str, int]:
    """The communication buffers (elements) the DeepSpeed config of ``cfg`` keeps per rank, for the
    planner's memory model (``vitscale.planner``): ``reduce`` (gradient reduction bucket; the whole
    all-reduce bucket without ZeRO), ``gather`` (ZeRO 1/2's parameter all-gather bucket, ZeRO-3's
    prefetch bucket), and ``overlap`` (1 when the preset overlaps reduction with the backward pass)."""
    ds = compose_ds_config(cfg, data_parallel=1, check_batch=False)
    zero = ds.get("zero_optimization", {})
    if cfg.parallel.zero == 0:
        return {"reduce": int(ds.get("allreduce_bucket_size", _DEFAULT_BUCKET)), "gather": 0, "overlap": 0}
    gather_key = "stage3_prefetch_bucket_size" if cfg.parallel.zero == 3 else "allgather_bucket_size"
    return {"reduce": int(zero.get("reduce_bucket_size", _DEFAULT_BUCKET)),
            "gather": int(zero.get(gather_key, _DEFAULT_BUCKET)),
            "overlap": int(bool(zero.get("overlap_comm", cfg.parallel.zero == 3)))}
