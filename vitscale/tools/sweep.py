"""``vitscale-sweep CONFIG [key=value ...] --procs 1,2,4 [--mode strong|weak] [--out DIR]``, and
``vitscale-sweep CONFIG [key=value ...] --grid KEY=V1,V2 [--grid ...] [--seeds S] --out DIR [--emit-sbatch]``.

Process counts (``--procs``): trains one config at several process counts on this machine, one
after the other, each with the deepspeed launcher into ``OUT/pN``, then makes the scaling table
of them (``vitscale-scaling``) in ``OUT``. ``--mode weak`` grows ``train.global_batch`` with the
process count (the config's batch belongs to the smallest count); strong keeps it.
``--emit-sbatch NODES...`` runs nothing: it prints the ``sbatch`` line of each node
count (``launch/slurm/juwels_booster.sbatch`` unless ``--sbatch-script``) and the
``vitscale-scaling`` line to run when the jobs are done. Checkpoints stay off
(``checkpoint.at_end=false``, ``checkpoint.resume=never``) so that no run resumes from another
and saving does not count.

Grids (``--grid``, repeatable, any config keys; ``--seeds S`` adds ``train.seed`` = the config's
seed + 0 .. S-1): every combination is a run in ``OUT/<key=value,...>``, trained here one after
another (single process each), resumable: a finished point is skipped when the same command runs
again, a half-finished one resumes from its checkpoint. Then ``OUT/sweep.csv``: the keys, params,
non-embedding params, samples seen, FLOPs, final and best train / eval loss, top-1, wall time
(``vitscale-fit OUT`` fits a law to it). ``--emit-sbatch`` (no node counts) runs nothing (it makes
``OUT``, where the array's logs go) and prints one SLURM array job (``#SBATCH --array=0-(n-1)``, index i = point i) built on
``--sbatch-script``. Every point's config is checked before anything runs. See ``tools/grid.py``.

A progress bar (stderr; where it is a terminal, or ``--progress``) counts the optimizer steps
of all runs, read from each run's ``metrics.jsonl`` as it grows (its new bytes, once a second).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vitscale.config import ConfigError, load_config, validate_layout
from vitscale.progress import LoggedSteps, add_progress_flags, progress_bar
from vitscale.tools import grid as grids
from vitscale.tools.scaling import main as scaling_main

logger = logging.getLogger(__name__)

_FIXED = ["checkpoint.at_end=false", "checkpoint.resume=never", "log.progress=false"]


def _counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be process counts separated by commas, e.g. 1,2,4")
    return sorted(set(counts))


def plan(config: str, overrides: list[str], counts: list[int], mode: str, per_count: int = 1) -> dict[int, list[str]]:
    """The overrides of each count's run, checked against its world size before anything starts.

    Args:
        config: the experiment YAML.
        overrides: the user's ``key=value`` overrides.
        counts: process counts (or node counts).
        mode: strong keeps ``train.global_batch``; weak scales it with the count.
        per_count: processes per count (GPUs per node for node counts).

    Returns:
        {count: overrides for that run, without run.dir}.
    """
    from vitscale.experiment import load_experiment  # the model and the data checked once, before anything runs

    cfg = load_experiment(config, overrides).cfg
    runs = {}
    for count in counts:
        extra = list(overrides) + _FIXED
        if mode == "weak":
            if (cfg.train.global_batch * count) % counts[0]:
                raise ConfigError(f"--mode weak: train.global_batch={cfg.train.global_batch} x {count} / {counts[0]} "
                                  "is not a whole batch; choose counts that are multiples of the smallest")
            extra.append(f"train.global_batch={cfg.train.global_batch * count // counts[0]}")
        validate_layout(load_config(config, extra), count * per_count)
        runs[count] = extra
    return runs


def sbatch_lines(config: str, runs: dict[int, list[str]], out: Path, mode: str, script: str) -> list[str]:
    """One ``sbatch`` line per node count, then the ``vitscale-scaling`` line."""
    lines = [shlex.join(["sbatch", f"--nodes={n}", f"--job-name=sweep-n{n}", script, config, *extra,
                         f"run.dir={out / f'n{n}'}"]) for n, extra in runs.items()]
    lines.append(shlex.join(["vitscale-scaling", *[str(out / f"n{n}") for n in runs], "--mode", mode, "--out",
                             str(out)]))
    return lines


def run_local(config: str, runs: dict[int, list[str]], out: Path, show_progress: bool | None = None) -> list[Path]:
    """Train each run with the deepspeed launcher; raise RuntimeError with the log's tail on failure."""
    from vitscale.distributed import free_port

    deepspeed = Path(sys.executable).parent / "deepspeed"
    steps = {count: load_config(config, extra).train.steps for count, extra in runs.items()}
    done = []
    with progress_bar(sum(steps.values()), "sweep", "step", show_progress) as bar:
        for count, extra in runs.items():
            run_dir = out / f"p{count}"
            if (run_dir / "metrics.jsonl").exists():
                raise RuntimeError(f"{run_dir} already holds a run; remove it or pass another --out")
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [str(deepspeed), "--num_gpus", str(count), "--master_port", str(free_port()), "--module",
                   "vitscale.train", config, *extra, f"run.dir={run_dir}"]
            logger.info("sweep: %d process(es): %s", count, shlex.join(cmd))
            bar.set_postfix_str(f"{count} process(es)")
            log, seen, logged = run_dir / "train.log", 0, LoggedSteps(run_dir / "metrics.jsonl")
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
                try:
                    while (rc := proc.poll()) is None:
                        time.sleep(1.0)
                        now = min(logged.read(), steps[count])
                        bar.update(now - seen)
                        seen = now
                except BaseException:  # Ctrl-C: the launcher goes too, as subprocess.run does
                    proc.kill()
                    proc.wait()
                    raise
            if rc != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                raise RuntimeError(f"the {count}-process run failed (exit {rc}); {log} ends:\n{tail}")
            bar.update(steps[count] - seen)
            done.append(run_dir)
    return done


def run_grid(args: argparse.Namespace, command: str) -> int:
    """The ``--grid`` mode (module docstring); ConfigError / RuntimeError propagate to ``main``."""
    base = load_config(args.config, args.overrides)  # the config and the user's overrides, checked first
    grid = grids.parse_grid(args.grid, args.seeds, base.train.seed)
    points = grids.grid_points(grid)
    grids.check_points(args.config, args.overrides, points)
    out = Path(args.out)
    if args.emit_sbatch is not None:
        out.mkdir(parents=True, exist_ok=True)  # SLURM opens the array's --output files there at the start
        sys.stdout.write(grids.sbatch_array(args.config, args.overrides, points, out, args.sbatch_script, command))
        return 0
    logger.info("sweep: %d grid point(s) of %s into %s", len(points), " x ".join(f"{k} ({len(v)})"
                                                                            for k, v in grid.items()), out)
    steps = {p.name: load_config(args.config, [*args.overrides, *p.overrides]).train.steps for p in points}
    with progress_bar(sum(steps.values()), "sweep", "step", args.progress) as bar:
        grids.run_points(args.config, args.overrides, points, out, bar, lambda p: steps[p.name])
    table = grids.write_table(out, points, list(grid))
    logger.info("sweep: wrote %s (%d rows)", table, len(points))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="vitscale-sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value (for every run)")
    ap.add_argument("--procs", type=_counts, help="process counts on this machine (default 1,2)")
    ap.add_argument("--mode", choices=["strong", "weak"], default="strong")
    ap.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                    help="a grid axis over any config key (repeatable): every combination is a run")
    ap.add_argument("--seeds", type=int, help="with --grid: S seeds per point (train.seed = the config's + 0..S-1)")
    ap.add_argument("--out", default="runs/sweep", help="folder for the runs and the table (default runs/sweep)")
    ap.add_argument("--emit-sbatch", nargs="*", type=int, metavar="NODES",
                    help="run nothing: --procs mode, the sbatch line of each node count; --grid mode (no counts), "
                         "one sbatch array job script on stdout")
    ap.add_argument("--sbatch-script", default="launch/slurm/juwels_booster.sbatch")
    ap.add_argument("--gpus-per-node", type=int, default=4, help="with --emit-sbatch, for the layout checks")
    add_progress_flags(ap)
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options (... --grid k=a,b train.steps=5)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    try:
        if args.grid:
            if args.procs is not None or args.emit_sbatch:
                ap.error("--grid runs each point as one process: drop --procs and the node counts of --emit-sbatch")
            return run_grid(args, "vitscale-sweep " + shlex.join(argv))
        if args.seeds is not None:
            ap.error("--seeds needs --grid")
        if args.emit_sbatch is not None:
            if not args.emit_sbatch:
                ap.error("--emit-sbatch needs node counts in --procs mode (e.g. --emit-sbatch 1 2 4), or --grid")
            runs = plan(args.config, args.overrides, sorted(set(args.emit_sbatch)), args.mode, args.gpus_per_node)
            sys.stdout.write("".join(line + "\n" for line in sbatch_lines(args.config, runs, out, args.mode,
                                                                        args.sbatch_script)))
            return 0
        runs = plan(args.config, args.overrides, args.procs or [1, 2], args.mode)
        run_dirs = run_local(args.config, runs, out, args.progress)
    except (ConfigError, RuntimeError) as e:
        logger.error("vitscale-sweep: %s", e)
        return 2
    return scaling_main([*map(str, run_dirs), "--mode", args.mode, "--out", str(out)])


if __name__ == "__main__":
    sys.exit(main())
