"""Starting a run: everything between the command line and the first step, in two phases with one
entry each, used by ``vitscale-train``, ``vitscale-recipe``, the tests' layout launcher and the
benchmarks alike.

- ``plan_run`` runs before any process group starts: the experiment loaded, resolved and checked
  (``vitscale.experiment``), the layout checked against the world size, the DeepSpeed config
  composed, the precision checked on this device, the checkpoint to resume from checked against
  the layout. Every mistake surfaces here, as a ``ConfigError`` / ``ValueError`` naming the fix.
- ``start_run`` runs on every rank once the process group exists: the run folder
  (``config.yaml``, ``ds_config.json``), the objective and the DeepSpeed engine, the resume (or
  reshard) with the data position and the EMA, this rank's data source and the device-side batch
  preparation (on rank 0 with the batch preview, ``preview.py``), the throughput meter, the
  metrics writer (and the monitors ``log.*`` asks for) and the progress bar: a ``Run``, which
  ``loop.train`` steps through.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vitscale.config import (ConfigError, Layout, compose_ds_config, compose_monitor_config, dump_config,
                             validate_layout)
from vitscale.data.captions import CaptionTokenizer
from vitscale.data.sources import DataSource, LoaderContext, build_source, source_class
from vitscale.distributed import ParallelDims, StopRequest, world_size_from_env
from vitscale.experiment import Experiment, load_experiment
from vitscale.files import write_text_atomic
from vitscale.models.noise import sample_keys
from vitscale.models.parallelize import pipeline_takes_noise, stage_flops, stage_tensors
from vitscale.train import checkpoint
from vitscale.train.batches import make_prepare, noise_keys, uses_channels_last
from vitscale.train.distill import Distillation, Teacher, build_teacher, resolve_teacher, with_teacher
from vitscale.train.captioning import split_batches
from vitscale.train.ema import build_ema, restore_ema
from vitscale.train.engine import build_engine, compute_dtype, precision_in_use
from vitscale.train.fast_path import describe as describe_fast_path
from vitscale.train.faults import hang_at, poisoned, stop_signals_blocked
from vitscale.train.monitors import Monitors
from vitscale.train.objective import Objective, build_objective
from vitscale.train.preview import previewed
from vitscale.train.reshard import check_resume, load_resharded
from vitscale.train.sparsity import restore_masks
from vitscale.train.step import PipelineSteps, PlainSteps, StepEngine
from vitscale.train.throughput import MetricsWriter, ThroughputMeter, device_peak_tflops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """A run checked before any process starts."""

    exp: Experiment
    layout: Layout
    ds_config: dict  # what deepspeed.initialize gets (also written to run.dir/ds_config.json)
    monitor_config: dict = field(default_factory=dict)  # DeepSpeed's monitor sections for log.*
    prediction: str = ""  # the planner's memory and step time of this layout (vitscale.planner), "" = none
    teacher: Teacher | None = None  # train.distill's teacher (train/distill.py), None = no distillation

    @property
    def layout_record(self) -> dict:
        """The layout as checkpoints record it (resume compares it)."""
        return {"pipe": self.layout.pipe, "tensor": self.layout.tensor, "data": self.layout.data,
                "zero": self.exp.cfg.parallel.zero}


def check_precision(precision: str, accelerator=None) -> None:
    """Refuse a precision the device cannot run, before any process starts (DeepSpeed
    would fail only inside ``deepspeed.initialize``)."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = {"fp32": True, "bf16": accelerator.is_bf16_supported(), "fp16": accelerator.is_fp16_supported()}
    if not supported[precision]:
        ok = [p for p, yes in supported.items() if yes]
        raise ConfigError(f"train.precision={precision} is not supported on {accelerator.device_name()}; "
                          f"use one of {', '.join(ok)}")


def plan_run(path: str | Path | None, overrides: list[str] = (), world_size: int | None = None) -> Plan:
    """Everything a start checks before any process group exists (see the module docstring).

    Args:
        path: the experiment YAML or a shipped config's name; None for the defaults.
        overrides: ``key.sub=value`` strings.
        world_size: processes in the job; None reads it from the launcher's environment.

    Raises:
        ConfigError, ValueError: naming the key and the fix.
    """
    exp = load_experiment(path, overrides)
    layout = validate_layout(exp.cfg, world_size_from_env() if world_size is None else world_size)
    ds_config = compose_ds_config(exp.cfg, layout.data, stage_tensors=stage_tensors(exp.model))
    check_precision(exp.cfg.train.precision)
    plan = Plan(exp, layout, ds_config, compose_monitor_config(exp.cfg), predict_layout(exp, layout.world_size),
                resolve_teacher(exp))
    check_resume(exp, plan.layout_record)
    return plan


def predict_layout(exp: Experiment, world_size: int) -> str:
    """The planner's prediction of this layout (``vitscale.planner``), logged by rank 0 at the start;
    warns (never fails) when the predicted memory exceeds the device's (known on a GPU only)."""
    from vitscale.planner import describe, predict_own_layout

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name, mem_gb, per_node = props.name, props.total_memory / 2**30, torch.cuda.device_count()
    else:  # the CPU: memory is the host's, shared by the ranks; only the columns are logged
        name, mem_gb, per_node = "cpu", None, world_size
    try:
        predicted, timed = predict_own_layout(exp, world_size, per_node, name, mem_gb)
    except Exception as e:  # noqa: BLE001  a prediction is advice: never stop a start for it
        logger.warning("no layout prediction: %s", e)
        return ""
    if mem_gb is not None and predicted.memory_gb > mem_gb:
        logger.warning("predicted memory per device %.1f GB exceeds the %.1f GB of %s (vitscale-plan lists layouts "
                       "that fit: more parallel.zero / tensor / pipe, parallel.activation_checkpoint=1 or a smaller "
                       "train.micro_batch)", predicted.memory_gb, mem_gb, name)
    return describe(predicted, timed)


@dataclass
class Run:
    """One process's share of a started run: what the step loop works with."""

    plan: Plan
    dims: ParallelDims
    engine: Any  # DeepSpeed's engine (or PipelineEngine)
    steps: StepEngine  # the engine as the step function sees it (train/step.py)
    objective: Objective
    start: int  # the step to continue from (0: a fresh run)
    source_cls: type[DataSource]  # on every rank: what the source keeps and counts
    source: DataSource | None  # this rank's; None on a pipeline's inner stages, which read no data
    fetch: Callable[[], tuple]  # the next micro-batch as (model inputs, target) on the device
    reports_data: bool  # this rank reports its data rank's counters (tensor rank 0 of the first stage)
    dtype: torch.dtype
    meter: ThroughputMeter
    writer: MetricsWriter | None  # global rank 0 writes metrics.jsonl
    progress: Any  # tqdm on global rank 0, or None
    ema: Any  # timm's ModelEmaV3, or None
    stop_request: StopRequest
    teacher: Any = None  # train.distill's frozen teacher on this rank (train/distill.py), or None

    @property
    def exp(self) -> Experiment:
        return self.plan.exp

    @property
    def cfg(self):
        return self.plan.exp.cfg

    @property
    def accum(self) -> int:
        return self.plan.ds_config["gradient_accumulation_steps"]

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()


def start_run(plan: Plan, dims: ParallelDims) -> Run:
    """This rank's part of the run ``plan`` describes, ready for its first step (module docstring)."""
    exp, cfg = plan.exp, plan.exp.cfg
    t, run_dir = cfg.train, Path(cfg.run.dir)
    seed_generators(t.seed, dims.data_rank)
    if dims.is_main:
        if plan.prediction:
            logger.info("%s (pipe %d x tensor %d x data %d, ZeRO-%d)", plan.prediction, dims.pipe, dims.tensor,
                        dims.data, cfg.parallel.zero)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        write_text_atomic(run_dir / "ds_config.json", json.dumps(plan.ds_config, indent=2) + "\n")
    torch.distributed.barrier()

    accum = plan.ds_config["gradient_accumulation_steps"]
    objective = build_objective(cfg, exp.model.kind, dims, accum)
    if plan.teacher is not None:
        d = t.distill
        objective = Distillation(objective, d.kind, d.temperature, d.alpha, accum)
    engine = build_engine(exp, dims, plan.ds_config, objective)
    if dims.is_main:  # the speed choices in force, read from what was built (fast_path.py)
        logger.info("speed: %s", describe_fast_path(cfg, engine, plan.ds_config, dims, precision_in_use(engine),
                                                    uses_channels_last(t.channels_last, dims.device)))
    stop_request = StopRequest()  # before the loader's workers fork: they inherit its handler
    try:
        start, client = checkpoint.load(engine, run_dir, cfg.checkpoint.resume, plan.layout_record)
    except checkpoint.LayoutChange as change:  # check_resume let it through: checkpoint.reshard=weights
        if cfg.checkpoint.reshard != "weights":
            raise
        start, client = load_resharded(engine, change.folder, exp, dims)
    if getattr(engine, "vitscale_sparsity", None) is not None and start:  # the masks resume as the weights do
        restore_masks(engine.vitscale_sparsity, client, start, engine.optimizer)

    piped = dims.pipe > 1
    meter = _meter(exp, dims, plan.teacher)
    if piped:  # pipelines time no forward of their own (throughput.py)
        steps: StepEngine = PipelineSteps(engine, pipeline_takes_noise(exp.model))
    else:
        steps = PlainSteps(engine, objective, accum, dims, own_norm=cfg.parallel.zero == 0 and t.precision == "fp32",
                           timed=meter.forward)
    source_cls = source_class(exp.source)
    source = _build_source(exp, dims, start, client) if steps.reads_data else None
    with stop_signals_blocked():  # the loader's workers start here and inherit the mask
        batches = iter(source) if source is not None else None

    dtype = compute_dtype(t.precision)
    prepare = make_prepare(exp, dims.device, dtype)
    if dims.is_main and cfg.log.preview and steps.reads_data:  # rank 0 (a pipeline's first stage) holds images
        prepare = previewed(prepare, run_dir / "preview.png", exp)
    if nan_steps := os.environ.get("VITSCALE_FAULT_NAN_STEP"):  # the fault-injection hook (faults.py)
        first, _, last = nan_steps.partition("-")
        prepare = poisoned(prepare, lambda: int(first) <= engine.global_steps + 1 <= int(last or first))
    hang_step = int(os.environ.get("VITSCALE_FAULT_HANG_STEP") or 0)
    if hang_step and int(os.environ.get("VITSCALE_FAULT_HANG_RANK") or 0) == dims.rank:  # the hang hook (faults.py)
        prepare = hang_at(os.environ.get("VITSCALE_FAULT_HANG_AT") or "step", hang_step, prepare, engine, dims,
                          lambda: engine.global_steps + 1 == hang_step)

    teacher = build_teacher(plan.teacher, dims, dtype) if plan.teacher is not None else None
    if teacher is not None:  # outermost: the teacher sees the images as the student will (distill.py)
        prepare = with_teacher(prepare, teacher)

    micro_batches = itertools.count()  # fetched so far: exactly accum per optimizer step

    def fetch() -> tuple:
        """The next micro-batch as (model inputs, target, noise keys) on the device."""
        keys = noise_keys(t.seed, engine.global_steps, next(micro_batches) % accum, t.micro_batch, t.global_batch,
                          dims.data_rank, dims.data, dims.device)
        with meter.data_wait():
            batch = next(batches)
        return (*prepare(batch), keys)

    if exp.model.kind == "cappa":  # each sample's branch, autoregressive or parallel prediction
        fetch = split_batches(fetch, t.cappa.parallel_fraction)
    ema = build_ema(engine.module, t.ema) if t.ema else None
    if ema is not None and start:  # the EMA resumes exactly as the weights do
        restore_ema(ema, client, start, dims.is_main)
    progress = None
    if dims.is_main and cfg.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    return Run(plan=plan, dims=dims, engine=engine, steps=steps, objective=objective, start=start,
               source_cls=source_cls, source=source, fetch=fetch,
               reports_data=dims.tensor_rank == 0 and (not piped or engine.is_first_stage()), dtype=dtype,
               meter=meter, writer=_writer(plan, run_dir, start) if dims.is_main else None,
               progress=progress, ema=ema, stop_request=stop_request, teacher=teacher)


def _writer(plan: Plan, run_dir: Path, start: int) -> MetricsWriter:
    """Global rank 0's writer of ``metrics.jsonl`` and the monitors ``log.*`` asks for."""
    monitors = Monitors(plan.monitor_config, plan.exp.cfg.log.wandb, run_dir, start) if plan.monitor_config else None
    return MetricsWriter(run_dir / "metrics.jsonl", monitors)


def seed_generators(seed: int, data_rank: int) -> None:
    """Seed torch (CPU and devices), numpy and Python's ``random`` from ``train.seed`` and the data
    rank: what draws from them (timm's Mixup / CutMix and random erasing, loader workers' seeds) is
    reproducible, and the ranks of one data replica (tensor peers, pipeline stages) draw alike.
    Dropout and drop-path do not draw from them: their masks are keyed (``models/noise.py``)."""
    derived = int(sample_keys(seed, torch.tensor([data_rank]))[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # every device's generator too


def _build_source(exp: Experiment, dims: ParallelDims, start: int, client: dict) -> DataSource:
    """This data rank's source, at the position a resumed checkpoint recorded."""
    text = exp.model.text
    ctx = LoaderContext(data_rank=dims.data_rank, data_world=dims.data, start_step=start,
                        pin_memory=dims.device.type == "cuda",
                        tokenizer=CaptionTokenizer(text.vocab_size, text.context_length) if text is not None else None,
                        patch_size=getattr(exp.model.arch, "patch_size", 16))
    source = build_source(exp.source, exp.cfg, ctx)
    state = client.get("data", {}).get(str(dims.data_rank))
    if state:
        source.load_state_dict(state)
    return source


def _meter(exp: Experiment, dims: ParallelDims, teacher: Teacher | None = None) -> ThroughputMeter:
    cfg, t = exp.cfg, exp.cfg.train
    pk = cfg.data.packing
    peak = cfg.log.peak_tflops
    if peak is None and dims.device.type == "cuda":
        peak = device_peak_tflops(torch.cuda.get_device_name(dims.device))
    return ThroughputMeter(dims, t.global_batch, exp.model.forward_flops(pk.seq_len, pk.max_images),
                           cfg.log.warmup_steps, peak, recompute=cfg.parallel.activation_checkpoint > 0,
                           straggler_fraction=cfg.log.straggler_fraction,
                           stage_flops=stage_flops(exp.model, dims.pipe, cfg.parallel.partition),
                           # a replicated teacher: each tensor rank runs it whole (distill.py)
                           teacher_flops_per_sample=teacher.forward_flops if teacher else 0, teacher_copies=dims.tensor,
                           info={"model": cfg.model.name, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
                                 "precision": t.precision, "layout": {"pipe": dims.pipe, "tensor": dims.tensor,
                                                                      "data": dims.data, "zero": cfg.parallel.zero}})
