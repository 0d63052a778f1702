"""The step loop: fetch micro-batches, forward, backward, step; log; checkpoint.

Faults (issue 9): every step the ranks agree (one tiny all-reduce) on whether a stop
signal arrived (SIGTERM: checkpoint after this step and stop; SIGUSR1: at the next log
interval) and whether the loss was NaN / Inf somewhere. Under fp16 DeepSpeed's loss scaler
skips such a step; under bf16 / fp32 ``train.max_bad_steps`` of them in a row raise
``NumericFault``; a step with a bad loss is never checkpointed. ``VITSCALE_FAULT_NAN_STEP=N``
or ``=N-M`` (a test hook) turns the inputs of step N (to M) into NaN on every rank.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from vitscale.config import Config, dump_config, is_clip, model_arch
from vitscale.data.captions import CaptionTokenizer
from vitscale.distributed import StopRequest
from vitscale.models.flops import forward_flops, packed_forward_flops
from vitscale.train import checkpoint
from vitscale.train.batches import build_loader, check_tensor_peers, data_records, gather_positions, make_prepare
from vitscale.train.engine import build_engine, build_loss, compute_dtype, grad_norm_fp32
from vitscale.train.faults import poisoned, report_bad_step, stop_signals_blocked
from vitscale.train.finetune import build_ema
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


def train_step(engine, fetch, accum: int, prepare, loss_fn, want_norm: bool = False, dims=None,
               timed=contextlib.nullcontext) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``accum`` micro-batches.

    Args:
        engine: the DeepSpeed engine.
        fetch: returns the next (uint8 images, labels) micro-batch.
        accum: micro-batches per step (DeepSpeed scales the loss by 1 / accum and steps on the last).
        prepare: a fetched batch -> (model inputs, loss target) on the device, images normalised.
        loss_fn: (model outputs, target) -> loss (``engine.build_loss``).
        want_norm: compute the gradient norm where DeepSpeed does not report one (ZeRO-0, fp32).
        dims: the layout (for that norm when the model is split over ranks).
        timed: a context manager around each forward pass (``ThroughputMeter.forward``).

    Returns:
        This rank's mean loss over the micro-batches (a device scalar), and the norm or None.
    """
    losses, norm = [], None
    batches = _collect(engine, fetch, accum, prepare, loss_fn)
    for micro in range(accum):
        inputs, target = batches[micro] if batches else prepare(*fetch())
        with timed():
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


def _sample_flops(cfg: Config) -> int:
    """Forward FLOPs of one sample: an image, an image-caption pair, or a packed sequence."""
    pk = cfg.data.packing
    if pk.seq_len:
        return packed_forward_flops(model_arch(cfg), pk.seq_len, pk.max_images)
    return forward_flops(model_arch(cfg))


def _evaluate(model, cfg: Config, dims, dtype, step: int, writer, ema=None) -> None:
    """Collective: ``cfg.eval``'s zero-shot / retrieval figures of a CLIP, or a classifier's
    top-1 / top-5 on ``data.test`` (and its EMA's), each data rank on its share."""
    from vitscale.train.evaluate import classify, evaluate_clip

    if not is_clip(cfg):
        d, results = cfg.data, {}
        for prefix, net in (("", model), ("ema_", ema.module if ema is not None else None)):
            if net is not None:
                got = classify(net, d.test, d.image_size, d.mean, d.std, dims.device, dtype, cfg.eval.batch_size,
                               dims.data_rank, dims.data, contribute=dims.tensor_rank == 0)
                results.update({f"{prefix}{k}": v for k, v in got.items()})
        if writer:
            writer.write({"kind": "eval", "step": step, **results})
            logger.info("test at step %d: top-1 %.2f %%, top-5 %.2f %%", step, results["top1"], results["top5"])
        return

    text = model_arch(cfg).text
    results = evaluate_clip(model, CaptionTokenizer(text.vocab_size, text.context_length), cfg, dims.device, dtype,
                            dims.data_rank, dims.data, contribute=dims.tensor_rank == 0)
    if writer:
        writer.write({"kind": "eval", "step": step, **results})
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))


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
    stop_request = StopRequest()  # before the loader's workers fork: they inherit its handler
    layout = {"pipe": dims.pipe, "tensor": dims.tensor, "data": dims.data, "zero": cfg.parallel.zero}
    try:
        start, client = checkpoint.load(engine, run_dir, cfg.checkpoint.resume, layout)
    except checkpoint.LayoutChange as change:  # checkpoint.check_resume let it through: reshard=weights
        if cfg.checkpoint.reshard != "weights":
            raise
        start, client = checkpoint.load_resharded(engine, change.folder, cfg, dims)
    piped = dims.pipe > 1
    # Inner pipeline stages never read data.
    needs_data = not piped or engine.is_first_stage() or engine.is_last_stage()
    source = build_loader(cfg, dims, start, client.get("data", {}).get(str(dims.data_rank))) if needs_data else None
    with stop_signals_blocked():  # the loader's workers start here and inherit the mask
        loader = iter(source) if source is not None else None
    laion = cfg.data.source == "laion"  # a loader whose position and counters need collecting
    # One rank per data rank reports data counters: tensor rank 0 of the first stage.
    reports_data = laion and dims.tensor_rank == 0 and (not piped or engine.is_first_stage())
    dtype = compute_dtype(t.precision)
    meter = ThroughputMeter(dims, t.global_batch, _sample_flops(cfg), cfg.log.warmup_steps,
                            _peak_tflops(cfg, dims.device), recompute=cfg.parallel.activation_checkpoint > 0,
                            straggler_fraction=cfg.log.straggler_fraction,
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

    prepare = make_prepare(cfg, dims, dtype)
    ema = build_ema(engine.module, t.ema) if t.ema else None
    if ema is not None and start:
        if "ema" in client:  # the EMA resumes exactly as the weights do
            ema.module.load_state_dict(client["ema"])
        elif dims.is_main:
            logger.warning("the checkpoint of step %d holds no EMA (train.ema was off, or resharded): the EMA "
                           "starts again from the resumed weights", start)
    if nan_steps := os.environ.get("VITSCALE_FAULT_NAN_STEP"):
        first, _, last = nan_steps.partition("-")
        prepare = poisoned(prepare, lambda: int(first) <= engine.global_steps + 1 <= int(last or first))

    record: dict = {}
    bad_steps = 0  # consecutive steps with a NaN / Inf loss
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
                                         dims=dims, timed=meter.forward)
        meter.end_step()
        if ema is not None:
            ema.update(engine.module, step=step + 1)
        if progress is not None:
            progress.update(1)
        signum, bad = stop_request.poll(dims.device, not torch.isfinite(loss_mean).all().item())
        bad_steps = bad_steps + 1 if bad and t.precision != "fp16" else 0
        if bad:
            report_bad_step(step + 1, bad_steps, t.precision, t.max_bad_steps, dims.is_main)

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
            if laion:
                rows += data_records(source if reports_data else None, dims, step + 1)
                if dims.tensor > 1 and source is not None:
                    check_tensor_peers(source.last_keys, dims.tensor_group(), dims.device)
            if writer:
                for row in [record] + rows:
                    writer.write(row)
            if progress is not None:
                speed = rows[0]["samples_per_s"] if rows else float("nan")
                progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", samples_s=f"{speed:.1f}")

        done = step + 1 == t.steps
        # SIGTERM: SLURM kills 30 s later, stop now; SIGUSR1 (--signal=USR1@120): at a log interval.
        stop = signum == signal.SIGTERM or (signum != 0 and log_now)
        wanted = (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or (done and cfg.checkpoint.at_end)
        saved = None
        if bad and (wanted or stop):
            if dims.is_main:
                logger.warning("no checkpoint at step %d: its loss was NaN / Inf", step + 1)
        elif wanted or stop:
            # After end_step: checkpoint time stays out of the throughput figures.
            extra = {"data": gather_positions(source, dims)} if laion else {}
            if ema is not None:  # every rank holds the same whole EMA (train.ema needs pipe = tensor = 1, ZeRO < 3)
                extra["ema"] = {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
            saved = checkpoint.save(engine, run_dir, step + 1, (step + 1) * t.global_batch, cfg.checkpoint.keep,
                                    dims.is_main, extra, layout)
        if (cfg.eval.every and (step + 1) % cfg.eval.every == 0) or (done and (cfg.eval.every or cfg.data.test)):
            _evaluate(engine.module, cfg, dims, dtype, step + 1, writer, ema)
        if stop:
            logger.warning("stopped at step %d on %s, %s; the next run with checkpoint.resume=auto continues from "
                           "the latest complete checkpoint", step + 1, signal.Signals(signum).name,
                           "checkpoint saved" if saved else "but its checkpoint could not be written (see above)")
            record = {**record, "stop_signal": signum}
            break

    if progress is not None:
        progress.close()
    if writer:
        writer.close()
    return record
