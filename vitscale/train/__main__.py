"""``python -m vitscale.train CONFIG [key.sub=value ...]`` (also ``vitscale-train``).

Runs under any launcher: ``deepspeed --module vitscale.train``, ``torchrun -m
vitscale.train``, ``mpirun -np N python -m vitscale.train``, ``srun python -m
vitscale.train``, or plain ``python -m vitscale.train`` for one process.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from vitscale.config import ConfigError
from vitscale.distributed import (EXIT_CONFIG, EXIT_NUMERIC, EXIT_TERMINATED, configure_cpu_threads, group_timeouts,
                                  init_distributed, shutdown)
from vitscale.watchdog import Heartbeat

USAGE = """usage: vitscale-train [CONFIG.yaml] [key.sub=value ...]

  CONFIG.yaml   experiment file (see configs/); the built-in defaults without it
  key=value     override any config key, e.g. train.steps=100 parallel.zero=2 run.dir=runs/x
"""


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split argv into the config path and overrides; drop ``--local_rank`` (the deepspeed launcher adds it)."""
    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            skip = "=" not in a
        elif a in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a}; overrides are written key.sub=value\n{USAGE}")
        else:
            args.append(a)
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("vitscale.train")
    try:  # every config error surfaces here, before any process group starts
        path, overrides = parse_args(sys.argv[1:] if argv is None else argv)  # --help before the heavy imports
        from vitscale.train.setup import plan_run

        plan = plan_run(path, overrides)
    except (ConfigError, ValueError) as e:
        log.error("config error: %s", e)
        return EXIT_CONFIG

    from vitscale.train.faults import NumericFault
    from vitscale.train.loop import train
    from vitscale.train.safe_load import UnsafeCheckpoint
    from vitscale.train.setup import start_run

    cfg = plan.exp.cfg
    dims = init_distributed(pipe=cfg.parallel.pipe, tensor=cfg.parallel.tensor, interface=cfg.parallel.interface,
                            timeout_s=cfg.parallel.timeout_s)
    level = getattr(logging, cfg.log.level.upper()) if dims.is_main else logging.WARNING
    logging.getLogger().setLevel(level)
    logging.getLogger("DeepSpeed").setLevel(max(level, logging.WARNING))
    configure_cpu_threads(dims)
    with Heartbeat(dims, cfg.parallel.heartbeat_s, cfg.parallel.timeout_s) as heartbeat:
        try:
            run = start_run(plan, dims)
            heartbeat.watch_progress(lambda: run.engine.global_steps)
            _check_group_timeouts(cfg.parallel.timeout_s, dims.is_main)
            last = train(run)
        except NumericFault as e:  # raised on every rank at the same step
            last = {"fault": e}
        except UnsafeCheckpoint as e:  # a file to resume or start from that would run code: bad input, not a fault
            log.error("refusing to start: %s", e)
            _leave(EXIT_CONFIG)  # no closing barrier: a rank whose files were fine may wait in a collective
        except RuntimeError as e:  # a collective failed: if a peer died, let the watchdog name it
            heartbeat.settle(e)
            raise
    if "fault" in last:
        if dims.is_main:
            log.error("%s", last["fault"])
        shutdown()
        _leave(EXIT_NUMERIC)
    if dims.is_main:
        log.info("done: step %s, loss %.4f; logs in %s/metrics.jsonl", last.get("step"), last.get("loss", float("nan")),
                 cfg.run.dir)
    shutdown()
    _leave(EXIT_TERMINATED if last.get("stop_signal") == signal.SIGTERM else 0)


def _check_group_timeouts(timeout_s: float, is_main: bool) -> None:
    """Every process group of the job, ours and those DeepSpeed made (the grid's, ZeRO's), now
    built, waits ``parallel.timeout_s`` in a collective (``distributed.set_new_group_timeout``):
    say so once, or name the groups that do not on every rank. A diagnostic: a backend whose
    options cannot be read (tested on gloo only) is reported, never fatal."""
    log = logging.getLogger("vitscale.train")
    try:
        timeouts = group_timeouts()
    except Exception as e:
        log.warning("could not read the process groups' timeouts (%s: %s)", type(e).__name__, e)
        return
    other = {name: s for name, s in timeouts.items() if s != timeout_s}
    if other:
        log.warning(
            "process groups that do not wait parallel.timeout_s=%g s in a collective: %s", timeout_s,
            ", ".join(f"{name}: {s:g} s" for name, s in other.items()))
    elif is_main:
        log.info(
            "all %d process groups of rank 0 wait at most parallel.timeout_s=%g s in a collective", len(timeouts),
            timeout_s)


def _leave(code: int) -> None:
    """Exit now, without the interpreter's teardown. Everything is written and the process
    group is gone, but C++ threads of torch's transports can still be joinable when their
    destructors run at exit, and std::terminate then aborts a finished run ("terminate
    called without an active exception", seen under mpirun and torchrun on a loaded
    machine), turning success into signal 6. MPI is finalised first where mpi4py started it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
