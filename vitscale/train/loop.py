"""The step loop: step, agree on faults and signals, log, checkpoint, evaluate.

Faults (issues 9, 18): every step the ranks agree (one tiny all-reduce) on whether a stop
signal arrived (SIGTERM or SIGUSR1 on any rank: all of them checkpoint after the step that learns
it and stop, and the log says how long after the signal the checkpoint was written), whether the
loss was NaN / Inf somewhere and whether the optimizer skipped the step; the answer is read one
step later, or at once at log and checkpoint steps (issue 21: no host synchronisation per step).
A step with a NaN / Inf loss or gradient norm on any rank is skipped on every rank
(``train/faults.py``; under fp16 by DeepSpeed's loss scaler); under bf16 / fp32
``train.max_bad_steps`` skipped steps in a row raise ``NumericFault``; a bad step is never
checkpointed. At log steps the ranks of a tensor-parallel group also check that they read the
same batch and hold the same replicated weights (``batches.check_tensor_peers``,
``replicas.check_replicated_weights``). Everything a run needs is set up by ``setup.start_run``;
one step is ``step.optimizer_step``.
"""
from __future__ import annotations

import logging
import signal
import time

import torch

from vitscale.models.parallelize import layer_prefixes
from vitscale.train import checkpoint
from vitscale.train.batches import check_tensor_peers, data_records, gather_positions
from vitscale.train.ema import ema_state
from vitscale.train.evaluate import evaluate_run
from vitscale.train.faults import check_skip_decision, child_signals_deferred, report_bad_step
from vitscale.train.replicas import check_replicated_weights
from vitscale.train.setup import Run
from vitscale.train.sparsity import STATE_KEY
from vitscale.train.step import optimizer_step

logger = logging.getLogger(__name__)


def train(run: Run) -> dict:
    """Train from ``run.start`` to ``train.steps`` (or a stop signal). Returns the last train record.

    No host synchronisation per step (issue 21): the loss and its finite flag stay on the device,
    and each step's agreement over the ranks (``StopRequest.start_poll``: a stop signal, a NaN / Inf
    loss, a skipped step) is started after the step and read one step later, once the next step's
    work is queued; at log, checkpoint and the last steps it is read at once (a log record, a
    checkpoint and the end need their own step's answer). So a stop signal or a streak of bad
    steps is acted on at most one step later than the step that saw it, and every rank acts at
    the same step (they read the same all-reduce at the same point). DeepSpeed's own optimizers
    still read their overflow flag on the host inside each step (ZeRO 1/2, BF16_Optimizer), as
    does ours for a plain optimizer (``faults.skip_nonfinite_steps``, fp32 without ZeRO): an
    optimizer that may skip a step must know before it updates."""
    cfg, t = run.cfg, run.cfg.train
    record: dict = {}
    state = _Faults(run)
    pending = None  # (step, its poll in flight)
    for step in range(run.start + 1, t.steps + 1):  # the step being taken, 1-based
        log_now = step % cfg.log.every == 0 or step == t.steps
        lr = run.engine.get_lr()[0]  # the lr this step uses
        run.meter.start_step()
        loss = optimizer_step(run.steps, run.fetch, run.accum, run.objective, measure_norm=log_now)
        run.meter.end_step()
        if run.ema is not None:
            run.ema.update(run.engine.module, step=step)
        if run.progress is not None:
            run.progress.update(1)
        skipped = not run.engine.was_step_applied()  # DeepSpeed's record (faults.py: ours too), already on the host
        poll = run.stop_request.start_poll(run.dims.device, ~torch.isfinite(loss.detach()).all(), skipped,
                                           not skipped)
        ended = time.monotonic()
        if pending is not None:  # the previous step's answer: its work is long done, this step's is queued
            state.settle(*pending)
        pending = (step, poll)
        done = step == t.steps
        checkpoint_now = bool((cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or
                              (done and cfg.checkpoint.at_end))
        eval_now = bool((cfg.eval.every and step % cfg.eval.every == 0) or (done and (cfg.eval.every or cfg.data.test)))
        if not (log_now or checkpoint_now or eval_now or done or state.stop):
            continue
        state.settle(*pending)  # this step's answer, now
        pending = None
        if log_now:
            record = _log(run, step, loss, lr, state.any_skipped)
        # A stop signal on any rank (SIGTERM: SLURM kills 30 s later; SIGUSR1, --signal=USR1@120: the time
        # limit is 120 s away), every rank learnt it from the same poll: checkpoint this step and stop.
        saved, written_s = None, 0.0
        if checkpoint_now or state.stop:
            saved = _checkpoint(run, step, state.bad)  # after end_step: checkpoint time stays out of the throughput
            written_s = time.monotonic() - ended
        if eval_now:
            _evaluate(run, step)
        if state.stop:
            name, lead = signal.Signals(state.stop).name, run.stop_request.age_s
            logger.warning("stopped at step %d on %s: %s (received %.1f s before the step ended); the next run with "
                           "checkpoint.resume=auto continues from the latest complete checkpoint", step, name,
                           f"checkpoint written {lead + written_s:.1f} s after {name}" if saved else
                           "its checkpoint could not be written (see above)", lead)
            record = {**record, "stop_signal": state.stop}
            break
    run.close()
    return record


class _Faults:
    """What the ranks agreed on, step by step (``settle``, in step order): a stop signal, bad steps
    in a row (reported; ``NumericFault`` at ``train.max_bad_steps``), and the latest step's flags."""

    def __init__(self, run: Run):
        self.run, self.bad_steps = run, 0  # consecutive bad steps: NaN / Inf loss or gradient norm, the step skipped
        self.stop, self.bad, self.any_skipped = 0, False, False

    def settle(self, step: int, poll) -> None:
        """Read ``step``'s poll (waiting for it if it is still in flight) and act on it."""
        t = self.run.cfg.train
        signum, loss_bad, any_skipped, any_applied = poll.result()
        check_skip_decision(step, loss_bad, any_skipped, any_applied)
        # fp16's loss scaler skips steps with finite losses while it finds its scale: not bad.
        self.bad = loss_bad or (any_skipped and t.precision != "fp16")
        self.any_skipped = any_skipped
        self.bad_steps = self.bad_steps + 1 if self.bad and t.precision != "fp16" else 0
        if self.bad:
            report_bad_step(step, self.bad_steps, t.precision, t.max_bad_steps, self.run.dims.is_main,
                            "loss" if loss_bad else "gradient norm")
        self.stop = self.stop or signum


def _log(run: Run, step: int, loss: torch.Tensor, lr: float, skipped: bool) -> dict:
    """Collective: the train record (loss averaged over data ranks; whether the optimizer skipped
    the step), throughput and data records; global rank 0 writes them. Returns the train record."""
    t, dims = run.cfg.train, run.dims
    loss_mean, norm = run.steps.mean_loss(loss), run.steps.grad_norm()
    record = {"kind": "train", "step": step, "samples": step * t.global_batch, "loss": loss_mean, "lr": lr,
              "grad_norm": float(norm) if norm is not None else None, "skipped": skipped}
    if (tape := getattr(run.engine.module, "adatape", None)) is not None:  # AdaTape (models/adatape.py)
        record["tape_tokens"] = _tape_tokens(tape, dims)
    if t.precision == "fp16":
        record["loss_scale"] = run.engine.optimizer.cur_scale
    if getattr(run.engine, "vitscale_sparsity", None) is not None:  # collective over the model-parallel ranks
        record.update(run.engine.vitscale_sparsity.record(dims.device))
    record.update(run.objective.metrics(dims))  # an objective's own terms (CapPa: loss_ar, loss_parallel)
    rows = run.meter.records(step)
    if run.source_cls.counters:
        rows += data_records(run.source_cls, run.source if run.reports_data else None, dims, step)
    if dims.tensor > 1 and run.source is not None and (fingerprint := run.source.fingerprint()) is not None:
        check_tensor_peers(fingerprint, dims.tensor_group(), dims.device)
    if dims.tensor > 1:  # every stage: its tensor ranks hold its replicated weights alike
        check_replicated_weights(run.engine.module, dims.tensor_group(), dims.device,
                                 layer_prefixes(run.exp.model) if dims.pipe > 1 else None)
    if run.writer:
        for row in [record] + rows:
            run.writer.write(row)
    if run.progress is not None:
        # the global throughput record; none before log.warmup_steps end (data records may still be there)
        speed = next((r["samples_per_s"] for r in rows if r["kind"] == "throughput"), float("nan"))
        run.progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.1f}")
    return record


def _tape_tokens(tape, dims) -> float:
    """Collective over the data ranks: the mean tape tokens per sample read since the last record
    (every forward pass of those steps; the tensor ranks of a replica read alike)."""
    counts = tape.take_counts().to(dims.device)
    torch.distributed.all_reduce(counts, group=dims.data_group())
    return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


def _checkpoint(run: Run, step: int, bad: bool):
    """Collective: save a checkpoint of ``step`` (not of a bad step, although its weights are those
    of the step before: a run that stops at ``train.max_bad_steps`` resumes from before the streak)."""
    if bad:
        if run.dims.is_main:
            logger.warning("no checkpoint at step %d: its loss or gradient norm was NaN / Inf", step)
        return None
    extra = {"data": gather_positions(run.source, run.dims)} if run.source_cls.stateful else {}
    if run.ema is not None:
        extra["ema"] = ema_state(run.ema)
    if getattr(run.engine, "vitscale_sparsity", None) is not None:
        # This rank's masks: unlike the rest of ``extra`` they differ between model-parallel ranks, and each
        # model-parallel rank's client state is its own file (written by its data rank 0, whose masks all its
        # data ranks share).
        extra[STATE_KEY] = run.engine.vitscale_sparsity.state_dict()
    with child_signals_deferred():  # a worker's death must not split the ranks inside the save's collectives
        return checkpoint.save(run.engine, run.cfg.run.dir, step, step * run.cfg.train.global_batch,
                               run.cfg.checkpoint.keep, run.dims.is_main, extra, run.plan.layout_record)


def _evaluate(run: Run, step: int) -> None:
    """Collective: the evaluation the config asks for; global rank 0 writes and logs an ``eval`` record."""
    results = evaluate_run(run.engine.module, run.exp, run.dims, run.dtype, run.ema)
    if run.writer:
        run.writer.write({"kind": "eval", "step": step, **results})
        logger.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
