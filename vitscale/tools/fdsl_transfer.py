"""``vitscale-recipe fdsl-transfer``: formula-driven pre-training against scratch, end to end.

    vitscale-recipe fdsl-transfer [--minutes M | --steps PRE,FINE] [--quick] [--out DIR] [--seed S]
                                  [--generators scratch,perlin,dead_leaves,bezier,rcdb,fractal]

For each pre-training source, the same tiny ViT is pre-trained on that synthetic dataset
(rendered on the fly, ``configs/vit_tiny.yaml``) for the same number of steps at the same
batch and resolution (the same compute), then fine-tuned on scikit-learn's handwritten
digits (built in, fixed train/test split) with the same DeiT recipe and seed
(``configs/vit_tiny_finetune.yaml``: RandAugment, Mixup/CutMix, label smoothing, random
erasing, layer-wise LR decay); ``scratch`` fine-tunes from random weights. Writes into
``--out``, every number read from the runs' ``metrics.jsonl``:

- ``fdsl_transfer.md``: ``Pre-training | top-1 | top-5 | pre-train steps | pre-train loss``
  (the form of the FDSL papers' tables), with the command that produced it,
- ``fdsl_transfer.csv``: the same numbers unrounded,
- ``fdsl_transfer.png``: top-1 per pre-training source as a bar chart,
- ``runs/pretrain_<source>/``, ``runs/finetune_<source>/``: the run folders.

``--minutes`` is the wall-clock budget of the whole recipe: a few probe steps per source
measure the step times, and the pre-training and fine-tuning step counts are chosen to fit
(55 % pre-training, 35 % fine-tuning), so a faster machine buys more steps; ``--steps PRE,FINE``
fixes the step counts instead (the same compute anywhere: compare tables across machines).
``--quick`` runs fixed tiny step counts (about two minutes on 2 CPU cores, for CI). All runs
share one process group (one process by default; under a launcher each run uses all of its
processes).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from vitscale.config import find_config
from vitscale.files import write_text_atomic

logger = logging.getLogger(__name__)

# The published FDSL tables' names for each source (Kataoka et al. 2020/2022, Baradad et al. 2021).
SOURCE_NAMES = {"scratch": "Scratch", "perlin": "Perlin noise", "dead_leaves": "Dead leaves",
                "bezier": "Bezier curves", "rcdb": "RCDB", "fractal": "FractalDB", "exfractal": "ExFractalDB",
                "visual_atom": "VisualAtom", "gratings": "Gratings"}
DEFAULT_SOURCES = "scratch,perlin,dead_leaves,bezier,rcdb,fractal"
QUICK_SOURCES = "scratch,dead_leaves,fractal"
COLUMNS = ["pretraining", "top1", "top5", "pretrain_steps", "pretrain_images", "pretrain_loss", "finetune_steps",
           "source", "seeds", "top1_ci95_low", "top1_ci95_high", "top1_per_seed", "pretrain_loss_per_seed",
           "left_chance"]
# The seed paper's table (Kataoka et al.: fine-tuned on CIFAR-10, top-1 %): the order our rows are compared with.
PUBLISHED_CIFAR10 = {"scratch": 78.3, "perlin": 95.0, "dead_leaves": 95.9, "bezier": 96.7, "rcdb": 96.8,
                     "fractal": 96.8}
LEFT_CHANCE = 0.9  # a pre-training "left chance" when its final loss is below 0.9 x ln(classes)
DONE_MARKER = "recipe_done.json"  # in a run folder: the run finished with the config and overrides it names
PRETRAIN_CLASSES = 100  # FractalDB-100-like; a class count other than the digits' 10, so the head is replaced


@dataclass(frozen=True)
class Plan:
    """Sizes of one recipe run (everything but the step counts is the same for every source)."""

    image_size: int
    patch_size: int
    depth: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    classes: int = PRETRAIN_CLASSES  # pre-training classes of each synthetic source


QUICK = Plan(image_size=32, patch_size=8, depth=2, batch=32, pretrain_steps=30, finetune_steps=40)
FULL = Plan(image_size=32, patch_size=8, depth=6, batch=64, pretrain_steps=0, finetune_steps=0)  # steps from --minutes


def _model_overrides(plan: Plan) -> list[str]:
    return [f"data.image_size={plan.image_size}", f"model.patch_size={plan.patch_size}", f"model.depth={plan.depth}",
            "model.num_heads=3", f"train.micro_batch={plan.batch}", f"train.global_batch={plan.batch}",
            "log.progress=false", "data.num_workers=1", "checkpoint.keep=1", "checkpoint.resume=never"]


def pretrain_overrides(plan: Plan, source: str, steps: int, run_dir: Path, seed: int) -> list[str]:
    return _model_overrides(plan) + [
        f"data.source={source}", f"data.num_classes={plan.classes}", f"train.steps={steps}",
        f"train.seed={seed}", f"optim.warmup_steps={max(1, steps // 10)}", f"log.every={max(1, min(10, steps // 3))}",
        f"run.dir={run_dir}"]


def finetune_overrides(plan: Plan, init: Path | None, steps: int, run_dir: Path, seed: int) -> list[str]:
    return _model_overrides(plan) + [
        f"model.init={init if init is not None else 'null'}", f"train.steps={steps}", f"train.seed={seed}",
        f"optim.warmup_steps={max(1, steps // 10)}", f"eval.every={max(1, steps // 2)}",
        f"log.every={max(1, min(10, steps // 3))}", f"run.dir={run_dir}"]


class Runner:
    """Trains configs one after another in one process group."""

    def __init__(self):
        from vitscale.distributed import configure_cpu_threads, init_distributed

        self.dims = init_distributed()
        configure_cpu_threads(self.dims)

    def train(self, config: Path, overrides: list[str]) -> Path:
        """Train ``config`` with ``overrides``; a run whose folder says it finished with the same
        config and overrides (``recipe_done.json``, written after it ends) is skipped, so a rerun of
        an interrupted recipe starts at the first unfinished run (which starts over)."""
        from vitscale.train.loop import train
        from vitscale.train.setup import plan_run, start_run

        plan = plan_run(config, overrides, self.dims.world_size)
        run_dir = Path(plan.exp.cfg.run.dir)
        marker, what = run_dir / DONE_MARKER, {"config": config.name, "overrides": overrides}
        if self._agreed(self.dims.is_main and marker.exists() and _read_json(marker) == what):
            logger.info("recipe: %s finished before with these overrides; skipped", run_dir)
            return run_dir
        if self.dims.is_main:
            logger.info("recipe: train %s %s", config.name, " ".join(overrides))
        last = train(start_run(plan, self.dims))
        if last.get("step") != plan.exp.cfg.train.steps:  # a stop signal ended it early: no marker, no next run
            raise SystemExit(f"recipe: {run_dir} stopped at step {last.get('step')} of {plan.exp.cfg.train.steps}; "
                             "rerun the same command to go on (finished runs are skipped, this one starts over)")
        if self.dims.is_main:
            write_text_atomic(marker, json.dumps(what, indent=1) + "\n")
        return run_dir

    def _agreed(self, decision: bool) -> bool:
        """The main rank's ``decision``, on every rank (one read of the file, not one per rank)."""
        import torch.distributed as dist

        if self.dims.world_size > 1 and dist.is_initialized():
            box = [decision]
            dist.broadcast_object_list(box, src=0)
            return bool(box[0])
        return decision


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_records(run_dir: Path, kind: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("kind") == kind]


def step_time_s(run_dir: Path) -> float:
    """Seconds per optimizer step from a run's last global throughput record."""
    rec = [r for r in read_records(run_dir, "throughput") if r.get("scope") == "global"][-1]
    return rec["global_batch"] / rec["samples_per_s"]


def budget_steps(minutes: float, pretrain_s: list[float], finetune_s: float, sources: int) -> tuple[int, int]:
    """Pre-training and fine-tuning step counts that fit ``minutes``: 55 % of it for the
    pre-trainings (the same step count for each, so the same compute), 35 % for the
    ``sources`` fine-tunings; the rest is start-up and evaluation."""
    pre = int(0.55 * minutes * 60 / sum(pretrain_s)) if pretrain_s else 0
    fine = int(0.35 * minutes * 60 / (finetune_s * sources))
    return max(pre, 10) if pretrain_s else 0, max(fine, 10)


def write_table(rows: list[dict], out: Path, command: str) -> dict[str, Path]:
    """``fdsl_transfer.md`` / ``.csv`` / ``.png`` into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"fdsl_transfer.{ext}" for ext in ("md", "csv", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    seeds = max(int(r.get("seeds") or 1) for r in rows)
    lines = [f"Fine-tuned on scikit-learn digits (1,437 train / 360 test images); `{command}`", "",
             f"top-1 and top-5: {'the mean over ' + str(seeds) + ' seeds, with the 95% t-interval of top-1' if seeds > 1 else 'one seed'}; "
             f"pre-train loss against chance ln(classes).", "",
             "| Pre-training | top-1 | top-5 | top-1 95% interval | pre-train steps | pre-train images | pre-train loss "
             "| left chance |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        loss = "–" if r["pretrain_loss"] is None else f"{r['pretrain_loss']:.3f}"
        ci = (f"[{r['top1_ci95_low']:.1f}, {r['top1_ci95_high']:.1f}]" if r.get("top1_ci95_low") not in (None, "")
              else "–")
        left = {True: "yes", False: "no", None: "–"}[r.get("left_chance")]
        lines.append(f"| {r['pretraining']} | {r['top1']:.1f} | {r['top5']:.1f} | {ci} | {r['pretrain_steps']} | "
                     f"{r['pretrain_images']} | {loss} | {left} |")
    lines += ["", *order_against_published(rows)]
    paths["md"].write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    bars = ax.bar([r["pretraining"] for r in rows], [r["top1"] for r in rows], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("top-1 on digits test (%)")
    ax.set_title("Fine-tuning after formula-driven pre-training")
    ax.set_ylim(0, 100)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def aggregate(per_seed: list[dict], classes: int) -> dict:
    """One table row from a source's rows of each seed: means, top-1's 95 % t-interval (two seeds or more),
    and whether every seed's pre-training left chance (final loss < LEFT_CHANCE x ln(classes))."""
    from scipy import stats

    first, n = per_seed[0], len(per_seed)
    top1 = [r["top1"] for r in per_seed]
    mean = sum(top1) / n
    low = high = ""
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * stats.tstd(top1) / math.sqrt(n)
        low, high = mean - half, mean + half
    losses = [r["pretrain_loss"] for r in per_seed]
    pretrained = losses[0] is not None
    return {**first, "top1": mean, "top5": sum(r["top5"] for r in per_seed) / n,
            "pretrain_loss": sum(losses) / n if pretrained else None, "seeds": n,
            "top1_ci95_low": low, "top1_ci95_high": high, "top1_per_seed": ";".join(f"{v:.2f}" for v in top1),
            "pretrain_loss_per_seed": ";".join(f"{v:.4f}" for v in losses) if pretrained else "",
            "left_chance": all(v < LEFT_CHANCE * math.log(classes) for v in losses) if pretrained else None}


def order_against_published(rows: list[dict]) -> list[str]:
    """Lines comparing the rows' top-1 order with the seed paper's (``PUBLISHED_CIFAR10``): each pair of
    sources the paper orders, whether ours agree, and whether our intervals separate the pair."""
    known = [r for r in rows if r["source"] in PUBLISHED_CIFAR10]
    agree = differ = unresolved = 0
    notes = []
    for i, a in enumerate(known):
        for b in known[i + 1:]:
            pa, pb = PUBLISHED_CIFAR10[a["source"]], PUBLISHED_CIFAR10[b["source"]]
            if pa == pb:
                continue
            lo, hi = (a, b) if pa < pb else (b, a)  # the paper: lo < hi
            same = lo["top1"] < hi["top1"]
            separated = (lo.get("top1_ci95_high") not in (None, "") and hi.get("top1_ci95_low") not in (None, "")
                         and (lo["top1_ci95_high"] < hi["top1_ci95_low"] or hi["top1_ci95_high"] < lo["top1_ci95_low"]))
            if not separated:
                unresolved += 1
            agree, differ = agree + same, differ + (not same)
            if not same:
                notes.append(f"{hi['pretraining']} < {lo['pretraining']}" + ("" if separated else " (within the intervals)"))
    if not agree + differ:
        return []
    return [f"Against the seed paper's order on CIFAR-10 (scratch 78.3 < Perlin 95.0 < dead leaves 95.9 < Bezier 96.7 "
            f"< RCDB 96.8 = FractalDB 96.8): {agree} of {agree + differ} ordered pairs agree; "
            f"{unresolved} of them are not separated by the 95% intervals"
            + (f"; reversed here: {', '.join(notes)}." if notes else ".")]


def fdsl_transfer(sources: list[str], out: Path, plan: Plan, minutes: float | None, seed: int,
                  command: str, seeds: int = 1, part: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run the recipe (module docstring) and write its table; returns the rows. ``part`` (i, n): only
    the seeds k with k % n == i, and no table (spreads the seeds over n processes or jobs; the same
    command without it then skips their finished runs and writes the table)."""
    runner, runs = Runner(), out / "runs"
    pretrain_cfg, finetune_cfg = find_config("vit_tiny"), find_config("vit_tiny_finetune")
    synthetic = [s for s in sources if s != "scratch"]
    if minutes is not None:  # probe each source's step time, then fit the budget
        started = time.monotonic()
        probe = dict(pretrain_steps=6, finetune_steps=6)
        times = [step_time_s(runner.train(pretrain_cfg, pretrain_overrides(plan, s, probe["pretrain_steps"],
                                                                           runs / f"probe_{s}", seed)
                                          + ["log.every=2", "log.warmup_steps=2", "checkpoint.at_end=false"]))
                 for s in synthetic]
        fine = step_time_s(runner.train(finetune_cfg, finetune_overrides(plan, None, probe["finetune_steps"],
                                                                         runs / "probe_finetune", seed)
                                        + ["log.every=2", "log.warmup_steps=2", "checkpoint.at_end=false",
                                           "data.test=null", "eval.every=0"]))
        left = minutes - (time.monotonic() - started) / 60
        pre_steps, fine_steps = budget_steps(left / seeds, times, fine, len(sources))
        plan = Plan(**{**plan.__dict__, "pretrain_steps": pre_steps, "finetune_steps": fine_steps})
        logger.info("recipe: %d pre-training and %d fine-tuning steps fit %.1f minutes (%d seed(s))", pre_steps,
                    fine_steps, left, seeds)
    by_source: dict[str, list[dict]] = {s: [] for s in sources}
    for k in range(seeds):
        if k % part[1] != part[0]:
            continue
        run_seed, folder = seed + k, runs if seeds == 1 else runs / f"seed{seed + k}"
        for source in sources:
            init, loss = None, None
            if source != "scratch":
                init = runner.train(pretrain_cfg, pretrain_overrides(plan, source, plan.pretrain_steps,
                                                                     folder / f"pretrain_{source}", run_seed))
                loss = read_records(init, "train")[-1]["loss"]
            tuned = runner.train(finetune_cfg, finetune_overrides(plan, init, plan.finetune_steps,
                                                                  folder / f"finetune_{source}", run_seed))
            last = read_records(tuned, "eval")[-1]
            steps = plan.pretrain_steps if init is not None else 0
            by_source[source].append({"pretraining": SOURCE_NAMES.get(source, source), "top1": last["top1"],
                                      "top5": last["top5"], "pretrain_steps": steps,
                                      "pretrain_images": steps * plan.batch, "pretrain_loss": loss,
                                      "finetune_steps": plan.finetune_steps, "source": source})
    if part[1] > 1:
        logger.info("recipe: part %d/%d done; the same command without --part writes the table", *part)
        return []
    rows = [aggregate(by_source[s], plan.classes) for s in sources]
    if runner.dims.is_main:
        paths = write_table(rows, out, command)
        print(paths["md"].read_text())
        logger.info("recipe: wrote %s", ", ".join(map(str, paths.values())))
    return rows
