"""Faults met in the step loop (issues 9, 18, 19): NaN / Inf steps, stop signals while loader
workers start, a loader worker dying during a checkpoint, and the fault-injection test hooks
``VITSCALE_FAULT_NAN_STEP`` and ``VITSCALE_FAULT_HANG_*`` (``hang_at``).

A bad step is never applied, in any precision, ZeRO stage or layout: a NaN / Inf loss makes its
own gradients NaN (``nonfinite_spreads``, in the objective), the data-parallel reduction carries
them to every data rank, and every optimizer then skips the step on every rank. DeepSpeed's
own wrappers already do (``BF16_Optimizer``, ZeRO 1-3 and the fp16 optimizers skip when the
gradient norm, summed over all ranks, is NaN / Inf, and say so in ``optimizer.overflow``); a
plain optimizer (fp32 without ZeRO) gets the same skip here (``skip_nonfinite_steps``). The
engine then leaves the LR schedule where it was (``runtime/engine.py`` ``_take_model_step``
steps the scheduler only when ``overflow`` is false): the schedule counts applied updates, in
every precision alike, as DeepSpeed's fp16 loss scaler always did. The loop asks the engine
(``was_step_applied``), counts bad steps in a row and stops at ``train.max_bad_steps``.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import time

import torch

logger = logging.getLogger(__name__)


class NumericFault(RuntimeError):
    """``train.max_bad_steps`` skipped steps in a row (bf16 / fp32), or ranks that disagree on a skip."""


def report_bad_step(step: int, in_a_row: int, precision: str, limit: int, is_main: bool,
                    what: str = "loss") -> None:
    """Log a skipped step (``what`` was NaN / Inf: the loss, or only the gradient norm); raise
    NumericFault (on every rank) at the limit."""
    if precision == "fp16":
        if is_main:
            logger.warning("step %d: NaN / Inf %s; fp16 loss scaling skips the step and lowers the scale", step, what)
        return
    if in_a_row >= limit:
        raise NumericFault(f"step {step}: the {what} was NaN / Inf for {in_a_row} step(s) in a row "
                           f"(train.max_bad_steps={limit}, train.precision={precision}); stopping without "
                           "writing a checkpoint. Resume from the last complete one (checkpoint.resume=auto) with "
                           "a lower train.lr, a longer optim.warmup_steps or optim.grad_clip, or check the data")
    if is_main:
        logger.warning("step %d: NaN / Inf %s: the step was skipped on every rank, the weights are unchanged "
                       "(%d of train.max_bad_steps=%d in a row)", step, what, in_a_row, limit)


def check_skip_decision(step: int, loss_bad: bool, any_skipped: bool, any_applied: bool) -> None:
    """A safety net over the flags all ranks agreed on: raise NumericFault when some ranks skipped
    step ``step`` and others applied it (the model copies differ now), or when a step with a NaN /
    Inf loss was applied. Neither can happen while every skip is decided over all ranks and a bad
    loss makes its gradients NaN (module docstring); a DeepSpeed path that did otherwise stops here."""
    if any_skipped and any_applied:
        problem = "some ranks skipped the optimizer step and others applied it, so the model copies differ now"
    elif loss_bad and any_applied:
        problem = "the loss was NaN / Inf but the optimizer step was applied"
    else:
        return
    raise NumericFault(f"step {step}: {problem}; stopping without writing a checkpoint. Resume from the last "
                       "complete one (checkpoint.resume=auto) and report the layout (parallel.*, train.precision)")


def nonfinite_spreads(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` with its value and gradient unchanged bit for bit (a factor of exactly 1), except
    that a NaN / Inf loss gets NaN gradients (a factor of NaN).

    A loss can be Inf while its gradients are finite (cross-entropy with a target logit of
    -Inf); the step must be skipped all the same, and every optimizer skips on NaN gradients
    (see the module docstring). No host synchronisation."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan"))).detach()


def skip_nonfinite_steps(engine) -> bool:
    """Make ``engine``'s optimizer skip a step whose gradients are NaN / Inf on any rank, on every
    rank, where DeepSpeed handed us a plain optimizer that would apply it (fp32 without ZeRO).

    DeepSpeed's own wrappers (``BF16_Optimizer``, ZeRO 1-3, fp16) skip such steps themselves and
    expose ``overflow``; the engine reads that attribute after ``optimizer.step()``
    (``_take_model_step``) to leave the LR schedule alone and count ``skipped_steps``, and
    ``engine.was_step_applied()`` reports it. The plain optimizer gets the same attribute and
    the same decision: its gradients (data-parallel reduced already) are checked on each rank
    and the verdict taken over all ranks (pipeline stages and tensor shards hold different
    gradients), one one-element all-reduce per step.

    Returns:
        Whether the skip was installed (False: DeepSpeed's optimizer skips on its own).
    """
    import torch.distributed as dist

    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):
        return False
    step = optimizer.step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device if params else torch.device("cpu")

    def step_unless_nonfinite(*args, **kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros(1, device=device)
        if grads:
            bad[0] = ~torch.stack([torch.isfinite(g).all() for g in grads]).all()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        optimizer.overflow = bool(bad.item())
        if optimizer.overflow:
            return None  # the engine zeroes the gradients next, as after every step
        return step(*args, **kwargs)

    optimizer.step = step_unless_nonfinite
    return True


@contextlib.contextmanager
def stop_signals_blocked():
    """SIGTERM / SIGUSR1 blocked while loader workers fork: they inherit the mask, so a signal
    sent to the whole process tree (SLURM, the deepspeed launcher) leaves them running for
    the step and checkpoint still to come (torch's worker handler would let SIGTERM kill
    them). The training process itself takes the signal through ``StopRequest``."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if not getattr(stop_signals_blocked, "registered", False):
        stop_signals_blocked.registered = True
        atexit.register(_kill_loader_workers)


@contextlib.contextmanager
def child_signals_deferred():
    """Hold back the SIGCHLD of a loader worker that dies until the block is done.

    torch's DataLoader handles SIGCHLD by raising in the main thread, wherever it is. Inside a
    checkpoint save that exception would be taken for a failed write: this rank would skip the
    rest of DeepSpeed's save (and its barrier) and vote in ``checkpoint._all_ok`` while the other
    ranks wait in that barrier, a mismatch that hangs them all (seen with ``kill -9`` of a worker
    mid-save). Deferred, the worker's death raises once the save's collectives are complete, and
    the job ends as on any lost rank."""
    received = []
    previous = signal.getsignal(signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)
        if received and callable(previous):
            previous(signal.SIGCHLD, None)  # torch's handler raises if a worker failed


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing's own handler (atexit runs handlers last-in first-out):
    that one stops daemonic children with SIGTERM, which workers forked under
    ``stop_signals_blocked`` never take, and would wait for them forever."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def poisoned(prepare, now):
    """``prepare`` whose images are NaN while ``now()`` holds (the fault-injection hook)."""
    def poisoned(*batch):
        inputs, target = prepare(*batch)
        if now():
            first = inputs[0] if isinstance(inputs, tuple) else inputs
            first.fill_(float("nan"))
        return inputs, target

    return poisoned


HANG_PLACES = ("step", "tensor", "grad")


def hang_at(place: str, step: int, prepare, engine, dims, now):
    """The hang hook (``VITSCALE_FAULT_HANG_STEP=N``, ``_RANK=R``, ``_AT=step|tensor|grad``): the
    calling rank stops making progress in step N, sleeping in Python forever while its other
    threads (the heartbeat) run, and never enters the collective the other ranks wait in:

    - ``step``: at its first micro-batch of step N, before any collective of the step;
    - ``tensor``: inside the first tensor-parallel all-reduce of step N (the forward's), which
      its tensor peers have entered (needs ``parallel.tensor`` > 1);
    - ``grad``: inside the data-parallel gradient reduction of step N (DeepSpeed's
      ``allreduce_gradients`` at the accumulation boundary), which its data peers have entered
      (needs a data-parallel degree > 1).

    Args:
        place: one of HANG_PLACES.
        step: N, 1-based.
        prepare: the batch -> inputs function the ``step`` hang wraps.
        engine: the DeepSpeed engine (``grad`` wraps its gradient reduction).
        dims: this rank's place (``tensor`` compares a collective's group with its tensor group).
        now: () -> whether the step being taken is N.

    Returns:
        ``prepare``, wrapped for ``step``.
    """
    import torch.distributed as dist

    def hang(what: str) -> None:
        logger.warning("VITSCALE_FAULT_HANG: rank %d stops making progress in step %d, %s", dims.rank, step, what)
        while True:
            time.sleep(3600)

    if place == "step":
        def stalled(*batch):
            if now():
                hang("before its first collective")
            return prepare(*batch)

        return stalled
    if place == "tensor":
        if dims.tensor < 2:
            raise ValueError("VITSCALE_FAULT_HANG_AT=tensor needs parallel.tensor > 1")
        tensor_ranks = dist.get_process_group_ranks(dims.tensor_group())
        all_reduce = dist.all_reduce

        def tensor_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if group is not None and now() and dist.get_process_group_ranks(group) == tensor_ranks:
                hang("inside a tensor-parallel all-reduce its tensor peers have entered")
            return all_reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = tensor_all_reduce  # models/tensor_parallel.py calls dist.all_reduce
        return prepare
    if place == "grad":
        if dims.data < 2:
            raise ValueError("VITSCALE_FAULT_HANG_AT=grad needs a data-parallel degree > 1")
        reduce = engine.allreduce_gradients

        def allreduce_gradients(*args, **kwargs):
            if now() and engine.is_gradient_accumulation_boundary():
                hang("inside the data-parallel gradient all-reduce its data peers have entered")
            return reduce(*args, **kwargs)

        engine.allreduce_gradients = allreduce_gradients  # DeepSpeed's backward calls self.allreduce_gradients()
        return prepare
    raise ValueError(f"VITSCALE_FAULT_HANG_AT={place}: one of {', '.join(HANG_PLACES)}")
