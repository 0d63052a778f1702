"""The step loop: fetch micro-batches, forward, backward, step; log; checkpoint.

Faults (issue 9): every step the ranks agree (one tiny all-reduce) on whether a stop
signal arrived (SIGTERM: checkpoint after this step and stop; SIGUSR1: at the next log
interval) and whether the loss was NaN / Inf somewhere. Under fp16 DeepSpeed's loss scaler
skips such a step; under bf16 / fp32 ``train.max_bad_steps`` of them in a row raise
``NumericFault``; a step with a bad loss is never checkpointed. ``VITSCALE_FAULT_NAN_STEP=N``
or ``=N-M`` (a test hook) turns the inputs of step N (to M) into NaN on every rank.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from vitscale.config import Config, dump_config, is_clip, model_arch
from vitscale.data.captions import CaptionTokenizer, build_caption_loader
from vitscale.data.downstream import build_downstream_loader, uses_downstream_loader
from vitscale.data.laion import BAD, COUNTERS, build_laion_loader, describe_stats
from vitscale.data.packing import normalize_patches, pack_batches
from vitscale.data.synthetic_loader import build_train_loader
from vitscale.data.transforms import crop_resize, normalize
from vitscale.distributed import StopRequest
from vitscale.models.flops import forward_flops, packed_forward_flops
from vitscale.train import checkpoint
from vitscale.train.engine import build_engine, build_loss, compute_dtype, grad_norm_fp32
from vitscale.train.finetune import BatchAugment, build_ema
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


def _build_loader(cfg: Config, dims, start: int, state: dict | None = None):
    """This rank's endless micro-batches: (images, labels) for a classifier, (images, token
    ids) for a CLIP on synthetic captions, (canvas images, token ids, crop boxes) for a CLIP
    on image-text shards (``data.source=laion``; ``state`` = its position from a checkpoint)."""
    t, d, pin = cfg.train, cfg.data, dims.device.type == "cuda"
    if d.source == "laion":
        text = model_arch(cfg).text
        return build_laion_loader(d, CaptionTokenizer(text.vocab_size, text.context_length), t.seed, t.micro_batch,
                                  dims.data_rank, dims.data, d.image_size, state=state, pin_memory=pin)
    if is_clip(cfg):
        text = model_arch(cfg).text
        return build_caption_loader(d.source, d.num_classes, d.image_size, d.instances, t.seed, t.micro_batch,
                                    t.global_batch, dims.data_rank, dims.data, start, d.num_workers, d.prefetch,
                                    pin, d.params, text.context_length, text.vocab_size)
    if uses_downstream_loader(d):  # fine-tuning data through timm's transforms
        return build_downstream_loader(d, t.seed, t.micro_batch, t.global_batch, dims.data_rank, dims.data,
                                       start_step=start, pin_memory=pin)
    loader = build_train_loader(d, t.seed, t.micro_batch, t.global_batch, dims.data_rank, dims.data,
                                start_step=start, pin_memory=pin)
    return _pack(cfg, loader, dims.data_rank) if d.packing.seq_len else loader


def _pack(cfg: Config, loader, data_rank: int):
    """NaViT packing as a loader stage: the image micro-batches -> micro-batches of packed
    sequences (patches, coords, segments, labels); see ``vitscale.data.packing``."""
    pk, arch = cfg.data.packing, model_arch(cfg)
    return pack_batches(loader, cfg.train.micro_batch, patch_size=arch.patch_size, seq_len=pk.seq_len,
                        max_images=pk.max_images, max_size=cfg.data.image_size, min_size=pk.min_size or None,
                        token_drop=pk.token_drop, seed=cfg.train.seed * 1000 + data_rank)


def _packed_prepare(device: torch.device, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype):
    def prepare(patches, coords, segments, labels):
        """A packed micro-batch -> ((normalised patches, coords, segments), labels) on the device."""
        patches = normalize_patches(patches.to(device, non_blocking=True), mean, std, dtype)
        coords, segments = coords.to(device, non_blocking=True), segments.to(device, non_blocking=True)
        return (patches, coords, segments), labels.to(device, non_blocking=True)

    return prepare


def _sample_flops(cfg: Config) -> int:
    """Forward FLOPs of one sample: an image, an image-caption pair, or a packed sequence."""
    pk = cfg.data.packing
    if pk.seq_len:
        return packed_forward_flops(model_arch(cfg), pk.seq_len, pk.max_images)
    return forward_flops(model_arch(cfg))


def _data_records(source, dims, step: int) -> list[dict]:
    """Collective: the image-text loader's counters summed over data ranks (``source`` None on
    ranks that do not report). Rank 0 logs them and returns a ``data`` record."""
    stats = source.stats() if source is not None else {}
    counts = torch.tensor([float(stats.get(k, 0)) for k in COUNTERS], dtype=torch.float64, device=dims.device)
    dist.all_reduce(counts)
    if not dims.is_main:
        return []
    total = {k: int(v) for k, v in zip(COUNTERS, counts.tolist())}
    logger.info("data at step %d: %s", step, describe_stats(total))
    bad = sum(total[k] for k in BAD)
    return [{"kind": "data", "step": step, **total, "bad": bad, "bad_fraction": bad / max(total["read"], 1)}]


def check_tensor_peers(keys: list[str], group, device) -> None:
    """Collective over a tensor-parallel group: its ranks must have read the same batch (they
    compute one model replica's shards); raise, naming the mismatch, if not."""
    mine = torch.tensor([zlib.crc32("\n".join(keys).encode())], dtype=torch.int64, device=device)
    peers = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(peers, mine, group=group)
    if len({int(p) for p in peers}) > 1:
        raise RuntimeError("the ranks of a tensor-parallel group read different batches (key checksums "
                           f"{[int(p) for p in peers]}); the loader must split by data-parallel rank")


def _gather_positions(source, dims) -> dict:
    """Collective: every data rank's loader position, keyed by data rank (for the checkpoint)."""
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, source.state_dict() if source is not None else None)
    return {str(s["data_rank"]): s for s in gathered if s is not None}


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


class NumericFault(RuntimeError):
    """``train.max_bad_steps`` steps in a row with a NaN / Inf loss (bf16 / fp32)."""


def _report_bad_step(step: int, in_a_row: int, precision: str, limit: int, is_main: bool) -> None:
    """Log a step with a NaN / Inf loss; raise NumericFault (on every rank) at the limit."""
    if precision == "fp16":
        if is_main:
            logger.warning("step %d: NaN / Inf loss; fp16 loss scaling skips the step and lowers the scale", step)
        return
    if in_a_row >= limit:
        raise NumericFault(f"step {step}: the loss was NaN / Inf for {in_a_row} step(s) in a row "
                           f"(train.max_bad_steps={limit}, train.precision={precision}); stopping without "
                           "writing a checkpoint. Resume from the last complete one (checkpoint.resume=auto) with "
                           "a lower train.lr, a longer optim.warmup_steps or optim.grad_clip, or check the data")
    if is_main:
        logger.warning("step %d: NaN / Inf loss (%d of train.max_bad_steps=%d in a row)", step, in_a_row, limit)


@contextlib.contextmanager
def _stop_signals_blocked():
    """SIGTERM / SIGUSR1 blocked while loader workers fork: they inherit the mask, so a signal
    sent to the whole process tree (SLURM, the deepspeed launcher) leaves them running for
    the step and checkpoint still to come (torch's worker handler would let SIGTERM kill
    them). The training process itself takes the signal through ``StopRequest``."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if not getattr(_stop_signals_blocked, "registered", False):
        _stop_signals_blocked.registered = True
        atexit.register(_kill_loader_workers)


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing's own handler (atexit runs handlers last-in first-out):
    that one stops daemonic children with SIGTERM, which workers forked under
    ``_stop_signals_blocked`` never take, and would wait for them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def _poisoned(prepare, now):
    """``prepare`` whose images are NaN while ``now()`` holds (the fault-injection hook)."""
    def poisoned(*batch):
        inputs, target = prepare(*batch)
        if now():
            first = inputs[0] if isinstance(inputs, tuple) else inputs
            first.fill_(float("nan"))
        return inputs, target

    return poisoned


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
    source = _build_loader(cfg, dims, start, client.get("data", {}).get(str(dims.data_rank))) if needs_data else None
    with _stop_signals_blocked():  # the loader's workers start here and inherit the mask
        loader = iter(source) if source is not None else None
    laion = cfg.data.source == "laion"  # a loader whose position and counters need collecting
    # One rank per data rank reports data counters: tensor rank 0 of the first stage.
    reports_data = laion and dims.tensor_rank == 0 and (not piped or engine.is_first_stage())
    clip = is_clip(cfg)
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

    mean = torch.tensor(cfg.data.mean, device=dims.device)
    std = torch.tensor(cfg.data.std, device=dims.device)

    def prepare(images, second, boxes=None):
        """(uint8 images, labels or token ids[, crop boxes]) -> (model inputs, loss target) on the
        device, images cut out and resized (boxes) and normalised."""
        images = images.to(dims.device, non_blocking=True)
        if boxes is not None:  # channels-last canvases: cut and resize on the device, float 0-255
            images = crop_resize(images.permute(0, 3, 1, 2), boxes, cfg.data.image_size)
        images = normalize(images, mean, std, dtype)
        second = second.to(dims.device, non_blocking=True)
        # A CLIP takes (images, tokens) and its loss no target; DeepSpeed's pipeline still
        # wants a tensor in the target's place, so the tokens stand in.
        return ((images, second), second) if clip else (images, second)

    if cfg.data.packing.seq_len:
        prepare = _packed_prepare(dims.device, mean, std, dtype)  # noqa: F811 (packed sequences instead)
    if BatchAugment.wanted(cfg):  # DeiT's random erasing and Mixup / CutMix on the normalised batch
        augment, plain = BatchAugment(cfg, dims.device), prepare
        prepare = lambda *batch: augment(*plain(*batch))  # noqa: E731, F811
    ema = build_ema(engine.module, t.ema) if t.ema else None
    if nan_steps := os.environ.get("VITSCALE_FAULT_NAN_STEP"):
        first, _, last = nan_steps.partition("-")
        prepare = _poisoned(prepare, lambda: int(first) <= engine.global_steps + 1 <= int(last or first))

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
            _report_bad_step(step + 1, bad_steps, t.precision, t.max_bad_steps, dims.is_main)

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
                rows += _data_records(source if reports_data else None, dims, step + 1)
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
            extra = {"data": _gather_positions(source, dims)} if laion else None
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
