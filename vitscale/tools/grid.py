"""Grid sweeps for ``vitscale-sweep CONFIG --grid KEY=V1,V2 ... [--seeds S] --out DIR``: the grid's points,
their run folders, resumable local runs, one SLURM array job for a cluster, and ``sweep.csv``.

Every point is one run of ``CONFIG`` with the user's overrides and the point's values, in
``DIR/<name>``, the name made of the grid's keys and values (``depth=2,lr=3e-4``). Points run
one after another, each a single-process ``python -m vitscale.train`` (its log in
``train.log``), with checkpoints on (``checkpoint.at_end=true``, ``checkpoint.resume=auto``), so:

- a point whose run finished has ``done.json`` (written atomically after the run exits 0) and is
  skipped when the sweep runs again;
- a point without it starts again and resumes from its newest complete checkpoint
  (``checkpoint.every`` sets how much an interrupted run keeps).

``sweep.csv`` has a row per point: the grid's keys (the values in the run's resolved
``config.yaml``), then ``run``, ``params``, ``non_embedding_params`` (``models/spec.py``),
``nonzero_params`` (a ``model.sparsity`` run's last logged count; ``params`` for a dense one),
``samples`` (seen: the last train record's), ``flops`` (training FLOPs: 3 x the forward FLOPs per
sample of ``models/flops.py`` x samples, the count MFU uses), ``train_loss`` / ``best_train_loss``
(final and lowest logged), ``eval_loss`` / ``best_eval_loss`` and ``top1`` / ``best_top1`` (blank
where the run has no such eval record), ``wall_s`` (seconds of the attempts that made the run).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitscale.config import ConfigError, load_config, parse_override
from vitscale.files import write_text_atomic
from vitscale.progress import LoggedSteps

logger = logging.getLogger(__name__)

DONE = "done.json"  # a finished point's marker
ATTEMPTS = "sweep_attempts.json"  # the seconds of each local attempt at a point
# Every point: checkpoints on, so an interrupted point resumes; no progress bar in the runs' logs.
GRID_FIXED = ["checkpoint.at_end=true", "checkpoint.resume=auto", "log.progress=false"]
REFUSED_KEYS = {"run.dir": "each point has its own run folder under --out",
                "checkpoint.resume": "the sweep resumes each point from its own checkpoints"}
COLUMNS = ["run", "params", "non_embedding_params", "nonzero_params", "samples", "flops", "train_loss", "best_train_loss", "eval_loss",
           "best_eval_loss", "top1", "best_top1", "wall_s"]


@dataclass(frozen=True)
class Point:
    """One grid point: its folder name and its overrides (``key=value`` in grid order)."""

    name: str
    overrides: list[str] = field(hash=False)


def split_values(text: str) -> list[str]:
    """``"1e-3,3e-4"`` -> ``["1e-3", "3e-4"]``; commas inside brackets stay (``[0.5,0.5,0.5],[0,0,0]``)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(texts: list[str], seeds: int | None = None, base_seed: int = 0) -> dict[str, list[str]]:
    """``--grid`` arguments (and ``--seeds``) -> {key: [value text, ...]} in the order given.

    Raises:
        ConfigError: a malformed argument, a key given twice, an empty value, a refused key.
    """
    grid: dict[str, list[str]] = {}
    for text in texts:
        key, sep, rest = text.partition("=")
        key = key.strip()
        if not sep or not key or not rest.strip():
            raise ConfigError(f"--grid {text}: write KEY=V1,V2,..., e.g. --grid train.lr=3e-4,1e-3")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid {key}=V1,V2,...")
        if key in REFUSED_KEYS:
            raise ConfigError(f"--grid {key}: not a grid key ({REFUSED_KEYS[key]})")
        values = split_values(rest)
        if any(not v for v in values) or len(set(values)) < len(values):
            raise ConfigError(f"--grid {text}: the values must be distinct and non-empty")
        grid[key] = values
    if seeds is not None:
        if seeds < 1:
            raise ConfigError(f"--seeds={seeds} must be at least 1")
        if "train.seed" in grid:
            raise ConfigError("--seeds and --grid train.seed=... both set the seed; give one of them")
        grid["train.seed"] = [str(base_seed + i) for i in range(seeds)]
    return grid


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last component for the folder names, the whole key where two would read alike."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def grid_points(grid: dict[str, list[str]]) -> list[Point]:
    """Every combination of the grid's values (the last key varying fastest), each with a readable name."""
    short = _short_names(list(grid))
    points = []
    for combo in itertools.product(*grid.values()):
        parts = [f"{short[k]}={re.sub(r'[^A-Za-z0-9._+-]', '_', v)}" for k, v in zip(grid, combo)]
        points.append(Point(",".join(parts), [f"{k}={v}" for k, v in zip(grid, combo)]))
    names = [p.name for p in points]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two grid points would share the folder '{dup}'; make the values differ in letters or "
                          "digits")
    return points


def check_points(config: str, overrides: list[str], points: list[Point]) -> None:
    """Every point's config loaded and resolved (keys, types, model, data) before anything runs.

    Raises:
        ConfigError: naming the point and what is wrong, e.g. an unknown key.
    """
    from vitscale.experiment import load_experiment  # the model and the data checked once per point

    for text in dict.fromkeys(t for p in points for t in p.overrides):  # each value once, said for its --grid
        key, _ = parse_override(text)
        try:
            load_config(config, [*overrides, text])
        except ConfigError as e:
            raise ConfigError(f"--grid {key}: {e}") from None
    for point in points:
        try:
            load_experiment(config, [*overrides, *GRID_FIXED, *point.overrides])
        except ConfigError as e:
            raise ConfigError(f"grid point {point.name}: {e}") from None


# --------------------------------------------------------------------------- local runs


def point_state(run_dir: Path) -> str:
    """``done`` (finished: ``done.json``), ``partial`` (a checkpoint to resume from), or ``new``."""
    from vitscale.train.checkpoint import checkpoint_root, complete_checkpoints  # torch only when asked

    if (run_dir / DONE).is_file():
        return "done"
    if complete_checkpoints(checkpoint_root(run_dir)):
        return "partial"
    return "new"


def _attempts(run_dir: Path) -> list[float]:
    try:
        return list(json.loads((run_dir / ATTEMPTS).read_text()))
    except (FileNotFoundError, ValueError):
        return []


def run_points(config: str, overrides: list[str], points: list[Point], out: Path, bar, steps_of) -> None:
    """Train each unfinished point (module docstring); raise RuntimeError with the log's tail on a failure.

    Args:
        bar: a progress bar counting optimizer steps (``progress.progress_bar``).
        steps_of: point -> its ``train.steps``.
    """
    for i, point in enumerate(points):
        run_dir = out / point.name
        state = point_state(run_dir)
        if state == "done":
            logger.info("sweep: [%d/%d] %s finished before (%s): skipped", i + 1, len(points), point.name, DONE)
            bar.update(steps_of(point))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        if state == "new" and (run_dir / "metrics.jsonl").exists():  # stopped before its first checkpoint
            os.replace(run_dir / "metrics.jsonl", run_dir / "metrics.jsonl.before-restart")
        cmd = [sys.executable, "-m", "vitscale.train", config, *overrides, *GRID_FIXED, *point.overrides,
               f"run.dir={run_dir}"]
        logger.info("sweep: [%d/%d] %s %s: %s", i + 1, len(points), point.name,
                    "resumes from its checkpoint" if state == "partial" else "starts", shlex.join(cmd))
        bar.set_postfix_str(point.name)
        log, logged = run_dir / "train.log", LoggedSteps(run_dir / "metrics.jsonl")
        seen = logged.read()
        bar.update(seen)
        started = time.monotonic()
        with open(log, "a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
            try:
                while (rc := proc.poll()) is None:
                    time.sleep(0.5)
                    now = min(logged.read(), steps_of(point))
                    bar.update(now - seen)
                    seen = now
            except BaseException:  # Ctrl-C: the run goes too; its checkpoints stay for the next sweep
                proc.kill()
                proc.wait()
                raise
        attempts = _attempts(run_dir) + [time.monotonic() - started]
        write_text_atomic(run_dir / ATTEMPTS, json.dumps(attempts) + "\n")
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"grid point {point.name} failed (exit {rc}); run the sweep again to resume it; "
                               f"{log} ends:\n{tail}")
        bar.update(steps_of(point) - seen)
        write_text_atomic(run_dir / DONE, json.dumps({"point": point.name, "overrides": point.overrides,
                                                      "wall_s": sum(attempts), "by": "vitscale-sweep"}) + "\n")


# --------------------------------------------------------------------------- the cluster


def sbatch_array(config: str, overrides: list[str], points: list[Point], out: Path, script: str, command: str) -> str:
    """One SLURM array job: index i runs ``script`` (the site's srun line and environment) on point i.

    The array job takes the ``#SBATCH`` lines of ``script`` but its job name and output; a finished
    point (``done.json``) exits at once, so resubmitting reruns (resumes) only the unfinished ones.
    """
    base = Path(script)
    if not base.is_file():
        raise ConfigError(f"--sbatch-script {script} does not exist; pass a launch/slurm/*.sbatch file")
    header = [line for line in base.read_text().splitlines()
              if line.startswith("#SBATCH") and not re.match(r"#SBATCH\s+--(job-name|output|array)\b", line)]
    lines = ["#!/usr/bin/env bash",
             f"# vitscale-sweep grid: {len(points)} points as one array job; index i trains point i into {out}/<point>.",
             f"#   sbatch [--nodes=N --account=...] THIS_FILE        (written by: {command})",
             "# A finished point (its done.json) exits at once: resubmit to resume the rest. When all are done,",
             "# the same command without --emit-sbatch skips them all and writes sweep.csv (and its report).",
             *header,
             "#SBATCH --job-name=vitscale-grid",
             f"#SBATCH --array=0-{len(points) - 1}",
             f"#SBATCH --output={out}/slurm-%A_%a.out",
             'case "${SLURM_ARRAY_TASK_ID:?submit this file with sbatch: it is an array job}" in']
    for i, point in enumerate(points):
        lines.append(f"  {i}) point={shlex.quote(point.name)}; overrides=({shlex.join(point.overrides)}) ;;")
    lines += [f'  *) echo "no grid point $SLURM_ARRAY_TASK_ID (0..{len(points) - 1})"; exit 2 ;;',
              "esac",
              f'dir={shlex.quote(str(out))}/"$point"',
              f'[ ! -f "$dir/{DONE}" ] || {{ echo "$dir finished before: skipped"; exit 0; }}',
              'mkdir -p "$dir"',
              "start=$SECONDS",
              f'bash {shlex.quote(script)} {shlex.join([config, *overrides, *GRID_FIXED])} "${{overrides[@]}}" '
              '"run.dir=$dir" || exit $?',
              f'printf \'{{"point": "%s", "wall_s": %d, "by": "sbatch"}}\\n\' "$point" $((SECONDS - start)) '
              f'> "$dir/.{DONE}.tmp" && mv "$dir/.{DONE}.tmp" "$dir/{DONE}"']
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the table


def _lookup(cfg, key: str, raw: str):
    """The value of a dotted key in a resolved config (through dataclasses and dicts); ``raw`` if absent."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return raw
    return node


def point_row(run_dir: Path, point: Point, keys: list[str]) -> dict:
    """A point's ``sweep.csv`` row (module docstring) from its run folder."""
    from vitscale.models.spec import resolve_model
    from vitscale.train.throughput import read_metrics

    cfg = load_config(run_dir / "config.yaml")
    spec = resolve_model(cfg.model, cfg.data.image_size, cfg.data.num_classes, cfg.train.loss)
    records = read_metrics(run_dir)
    train = {r["step"]: r for r in records if r.get("kind") == "train"}  # a resumed run's steps: the last wins
    train = [train[s] for s in sorted(train)]
    if not train:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no train record")
    losses = [r["loss"] for r in train if not r.get("skipped") and math.isfinite(r["loss"])]
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_losses = [r["loss"] for r in evals if isinstance(r.get("loss"), (int, float))]
    top1 = [r["top1"] for r in evals if isinstance(r.get("top1"), (int, float))]
    pk = cfg.data.packing
    samples = int(train[-1]["samples"])
    done = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).is_file() else {}
    row = {key: _lookup(cfg, key, text.partition("=")[2]) for key, text in zip(keys, point.overrides)}
    row.update({"run": point.name, "params": spec.parameters, "non_embedding_params": spec.non_embedding_parameters,
                "nonzero_params": train[-1].get("nonzero_params", spec.parameters),
                "samples": samples, "flops": 3 * spec.forward_flops(pk.seq_len, pk.max_images) * samples,
                "train_loss": train[-1]["loss"], "best_train_loss": min(losses) if losses else "",
                "eval_loss": eval_losses[-1] if eval_losses else "", "best_eval_loss": min(eval_losses, default=""),
                "top1": top1[-1] if top1 else "", "best_top1": max(top1, default=""),
                "wall_s": round(done["wall_s"], 2) if "wall_s" in done else ""})
    return row


def write_table(out: Path, points: list[Point], keys: list[str]) -> Path:
    """``out/sweep.csv``, one row per point, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*keys, *COLUMNS], lineterminator="\n")
    writer.writeheader()
    for point in points:
        writer.writerow(point_row(out / point.name, point, keys))
    path = out / "sweep.csv"
    write_text_atomic(path, buf.getvalue())
    return path
