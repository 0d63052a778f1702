"""Faults met in the step loop (issue 9): NaN / Inf losses, stop signals while loader
workers start, a loader worker dying during a checkpoint, and the ``VITSCALE_FAULT_NAN_STEP``
test hook."""
from __future__ import annotations

import atexit
import contextlib
import logging
import signal

logger = logging.getLogger(__name__)


class NumericFault(RuntimeError):
    """``train.max_bad_steps`` steps in a row with a NaN / Inf loss (bf16 / fp32)."""


def report_bad_step(step: int, in_a_row: int, precision: str, limit: int, is_main: bool) -> None:
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
