"""The step loop: fetch micro-batches, forward, backward, step; log; checkpoint."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from vitscale.config import Config, dump_config, is_clip, model_arch
from vitscale.data.captions import build_caption_loader
from vitscale.data.synthetic_loader import build_train_loader
from vitscale.data.transforms import normalize
from vitscale.models.flops import forward_flops
from vitscale.train import checkpoint
from vitscale.train.engine import build_engine, build_loss, compute_dtype, grad_norm_fp32
from vitscale.train.throughput import MetricsWriter, ThroughputMeter, device_peak_tflops

logger = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _peak_tflops(cfg: Config, device: torch.device) -> float | None:
    if cfg.log.peak_tflops is not None:
        return cfg.log.peak_tflops
    if device.type == "cuda":
        return device_peak_tflops(torch.cuda.get_device_name(device))
    return None


def train_step(engine, fetch, accum: int, prepare, loss_fn,
               want_norm: bool = False, dims=None) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``accum`` micro-batches.

    Args:
        engine: the DeepSpeed engine.
        fetch: returns the next (uint8 images, labels) micro-batch.
        accum: micro-batches per step (DeepSpeed scales the loss by 1 / accum and steps on the last).
        prepare: a fetched batch -> (model inputs, loss target) on the device, images normalised.
        loss_fn: (model outputs, target) -> loss (``engine.build_loss``).
        want_norm: compute the gradient norm where DeepSpeed does not report one (ZeRO-0, fp32).
        dims: the layout (for that norm when the model is split over ranks).

    Returns:
        This rank's mean loss over the micro-batches (a device scalar), and the norm or None.
    """
    losses, norm = [], None
    batches = _collect(engine, fetch, accum, prepare, loss_fn)
    for micro in range(accum):
        inputs, target = batches[micro] if batches else prepare(*fetch())
        loss = loss_fn(_forward(engine, inputs), target)
        engine.backward(loss)
        if want_norm and micro == accum - 1:
            norm = grad_norm_fp32(engine.module, dims)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean(), norm


def _forward(engine, inputs):
    return engine(*inputs) if isinstance(inputs, tuple) else engine(inputs)


def _collect(engine, fetch, accum: int, prepare, loss_fn) -> list | None:
    """For a loss over all micro-batches of a step (``engine.WholeBatchContrastive``): fetch
    them, run them forward without gradients so the loss caches their features, and return
    them for the training pass. None when the loss needs no such pass."""
    if not hasattr(loss_fn, "collect") or accum == 1:
        return None
    batches = [prepare(*fetch()) for _ in range(accum)]
    loss_fn.collect()
    with torch.no_grad():
        for inputs, target in batches:
            loss_fn(_forward(engine, inputs), target)
    loss_fn.train()
    return batches


def pipeline_step(engine, fetch, prepare, loss_fn, accum: int) -> torch.Tensor:
    """One optimizer step of a ``PipelineEngine``: DeepSpeed runs the micro-batches through the
    stages (1F1B schedule) and returns the loss already averaged over micro-batches and
    data-parallel ranks, on every stage. Only the first and last stage read data. A loss
    over the whole step (``engine.WholeBatchContrastive``) first collects features with a
    forward-only pass (DeepSpeed's ``eval_batch``) over the same micro-batches."""
    if hasattr(loss_fn, "collect") and accum > 1:
        reads = engine.is_first_stage() or engine.is_last_stage()
        batches = [prepare(*fetch()) for _ in range(accum)] if reads else []
        loss_fn.collect()
        engine.eval_batch(iter(batches), compute_loss=True, bcast_loss=False)
        loss_fn.train()
        return engine.train_batch(data_iter=iter(batches))

    class Batches:
        def __iter__(self):
            return self

        def __next__(self):
            return prepare(*fetch())

    return engine.train_batch(data_iter=Batches())


def _build_loader(cfg: Config, dims, start: int):
    """This rank's endless micro-batches: (images, labels) for a classifier, (images, token
    ids) for a CLIP (the built-in image-caption stand-in until the LAION loader)."""
    t, d, pin = cfg.train, cfg.data, dims.device.type == "cuda"
    if is_clip(cfg):
        text = model_arch(cfg).text
        return build_caption_loader(d.source, d.num_classes, d.image_size, d.instances, t.seed, t.micro_batch,
                                    t.global_batch, dims.data_rank, dims.data, start, d.num_workers, d.prefetch,
                                    pin, d.params, text.context_length, text.vocab_size)
    return build_train_loader(d, t.seed, t.micro_batch, t.global_batch, dims.data_rank, dims.data,
                              start_step=start, pin_memory=pin)


def train(cfg: Config, dims, ds_config: dict) -> dict:
    """Train ``cfg`` on this process's share of the layout. Returns the last train record."""
    run_dir = Path(cfg.run.dir)
    if dims.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "config.yaml", dump_config(cfg))
        _write_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=2) + "\n")
    dist.barrier()

    t, accum = cfg.train, ds_config["gradient_accumulation_steps"]
    loss_fn = build_loss(cfg, dims, accum)
    engine = build_engine(cfg, dims, ds_config, loss_fn)
    start = checkpoint.load(engine, run_dir, cfg.checkpoint.resume)
    piped = dims.pipe > 1
    # Inner pipeline stages never read data.
    needs_data = not piped or engine.is_first_stage() or engine.is_last_stage()
    loader = iter(_build_loader(cfg, dims, start)) if needs_data else None
    clip = is_clip(cfg)
    dtype = compute_dtype(t.precision)
    meter = ThroughputMeter(dims, t.global_batch, forward_flops(model_arch(cfg)), cfg.log.warmup_steps,
                            _peak_tflops(cfg, dims.device), recompute=cfg.parallel.activation_checkpoint > 0,
                            info={
                                "model": cfg.model.name, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
                                "precision": t.precision, "layout": {"pipe": dims.pipe, "tensor": dims.tensor,
                                                                     "data": dims.data, "zero": cfg.parallel.zero}})
    writer = MetricsWriter(run_dir / "metrics.jsonl") if dims.is_main else None
    progress = None
    if dims.is_main and cfg.log.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def fetch():
        with meter.data_wait():
            return next(loader)

    mean = torch.tensor(cfg.data.mean, device=dims.device)
    std = torch.tensor(cfg.data.std, device=dims.device)

    def prepare(images, second):
        """(uint8 images, labels or token ids) -> (model inputs, loss target) on the device."""
        images = normalize(images.to(dims.device, non_blocking=True), mean, std, dtype)
        second = second.to(dims.device, non_blocking=True)
        # A CLIP takes (images, tokens) and its loss no target; DeepSpeed's pipeline still
        # wants a tensor in the target's place, so the tokens stand in.
        return ((images, second), second) if clip else (images, second)

    record: dict = {}
    for step in range(start, t.steps):
        log_now = (step + 1) % cfg.log.every == 0 or step + 1 == t.steps
        lr = engine.get_lr()[0]  # the lr this step uses
        meter.start_step()
        if piped:
            loss_mean = pipeline_step(engine, fetch, prepare, loss_fn, accum)
            norm = getattr(engine, "vitscale_grad_norm", None)
        else:
            loss_mean, norm = train_step(engine, fetch, accum, prepare, loss_fn,
                                         want_norm=log_now and cfg.parallel.zero == 0 and t.precision == "fp32",
                                         dims=dims)
        meter.end_step()
        if progress is not None:
            progress.update(1)

        if log_now:
            if piped:  # already the data-parallel mean
                loss_mean = loss_mean.item()
            else:
                dist.all_reduce(loss_mean, group=dims.data_group())
                loss_mean = loss_mean.item() / dims.data
            norm = engine.get_global_grad_norm() if norm is None else norm
            record = {"kind": "train", "step": step + 1, "samples": (step + 1) * t.global_batch,
                      "loss": loss_mean, "lr": lr,
                      "grad_norm": float(norm) if norm is not None else None}
            if t.precision == "fp16":
                record["loss_scale"] = engine.optimizer.cur_scale
            rows = meter.records(step + 1)
            if writer:
                for row in [record] + rows:
                    writer.write(row)
            if progress is not None:
                speed = rows[0]["samples_per_s"] if rows else float("nan")
                progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{speed:.1f}")

        done = step + 1 == t.steps
        if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or (done and cfg.checkpoint.at_end):
            # After end_step: checkpoint time stays out of the throughput figures.
            checkpoint.save(engine, run_dir, step + 1, (step + 1) * t.global_batch, cfg.checkpoint.keep,
                            dims.is_main)

    if progress is not None:
        progress.close()
    if writer:
        writer.close()
    return record
