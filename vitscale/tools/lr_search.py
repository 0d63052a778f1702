"""``vitscale-recipe vit-l-search``: the hyper-parameter search for large ViTs, as a recipe.

    vitscale-recipe vit-l-search [--sizes ti,s,b] [--lr 1e-4,3e-4,1e-3,3e-3] [--batch 32] [--warmup 10]
                                 [--wd 0.05] [--grid KEY=V1,V2 ...] [--depth D] [--seeds S] [--config CFG]
                                 [--metric train_loss|eval_loss] [--out DIR] [--emit-sbatch] [key=value ...]

The FDSL work leaves open why ViT-L/16 falls below ViT-B/16 at batch 2048, lr 5e-4 ("we need to
find the optimal hyperparameters"). This recipe searches LR x batch x warm-up x weight decay (and
any further ``--grid`` keys: ``optim.name=adamw,lion,lamb``, ``model.qk_norm=true,false``, the
ViT-22B options) over a model-size ladder, the sizes timm's widths (Ti 192, S 384, B 768, L 1024,
H 1280), each with its own heads and (unless ``--depth`` caps it, for a CPU) its own depth. Every
point is one run of ``vitscale-sweep --grid``'s machinery (``tools/grid.py``): resumable (a
finished point is skipped, a half-finished one resumes), or one SLURM array job with
``--emit-sbatch`` (then the same command without it, once the array is done, writes the report).

It writes into ``--out`` (besides each point's run folder and ``sweep.csv``):

- ``lr_search.md``: per size, its width and parameters, the best point (its LR, batch, warm-up,
  weight decay, further keys) and metric, and the optimum LR interpolated from the LR axis at
  the best point's other values (a parabola in log LR through the best LR and its two
  neighbours; an optimum at the edge of ``--lr`` is said to be one, and the search should be
  widened there);
- ``lr_opt.csv`` (``size,width,params,lr,edge``) and ``lr_fit/``: the optimum LR against width,
  fitted with ``vitscale-fit``'s power law lr* = A / width^alpha (bootstrap intervals), which
  answers whether the optimum shifts with size (alpha > 0: smaller LRs for wider models, as
  muP's 1/width rule for Adam's hidden layers predicts; alpha near 0: no shift);
- ``lr_search.png``: the metric against LR per size at its best other values, the optima marked.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitscale.config import ConfigError, load_config
from vitscale.files import replacing, write_text_atomic

logger = logging.getLogger(__name__)

# timm's ViT ladder: (registered name at patch 16, width, heads, depth).
SIZES = {"ti": ("vit_tiny_patch16", 192, 3, 12), "s": ("vit_small_patch16", 384, 6, 12),
         "b": ("vit_base_patch16", 768, 12, 12), "l": ("vit_large_patch16", 1024, 16, 24),
         "h": ("vit_huge_patch16", 1280, 16, 32)}
SIZE_KEYS = ["model.name", "model.num_heads", "model.depth"]  # the overrides a size sets, first in each point


@dataclass(frozen=True)
class SearchSpace:
    """The recipe's axes: sizes, then the hyper-parameter grid (``--grid`` keys last)."""

    sizes: list[str]
    grid: dict[str, list[str]]  # config key -> value texts (train.lr first)
    depth: int | None = None


def search_space(sizes: str, lr: str, batch: str, warmup: str, wd: str, extra: list[str], depth: int | None,
                 seeds: int | None, base_seed: int) -> SearchSpace:
    """The axes from the recipe's options (``grid.parse_grid`` checks every ``KEY=V1,V2``)."""
    from vitscale.tools.grid import parse_grid

    names = [s.strip().lower() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIZES]
    if unknown or not names:
        raise ConfigError(f"--sizes {sizes}: choose from {', '.join(SIZES)} (e.g. --sizes ti,s,b)")
    if depth is not None and depth < 1:
        raise ConfigError(f"--depth={depth} must be at least 1")
    axes = [f"train.lr={lr}", f"train.global_batch={batch}", f"optim.warmup_steps={warmup}",
            f"optim.weight_decay={wd}", *extra]
    taken = {"model.name", "model.num_heads", "model.depth", "model.embed_dim"}
    for text in extra:
        key = text.partition("=")[0].strip()
        if key in taken or key in {a.partition("=")[0] for a in axes[:4]}:
            raise ConfigError(f"--grid {key}: the recipe sets it (--sizes / --depth / --lr / --batch / --warmup / "
                              "--wd); use those options")
    grid = parse_grid(axes, seeds, base_seed)
    if len(grid["train.lr"]) < 3:
        logger.warning("vit-l-search: %d LR value(s): the optimum is interpolated from 3 or more", len(grid["train.lr"]))
    return SearchSpace(names, grid, depth)


def points(space: SearchSpace, micro_batch: int):
    """Every (size, grid point) as a ``grid.Point`` named ``size=S,...``; the micro-batch divides every batch."""
    from vitscale.tools.grid import Point, grid_points

    micro = math.gcd(micro_batch, *(int(b) for b in space.grid["train.global_batch"]))
    out = []
    for size in space.sizes:
        name, _, heads, depth = SIZES[size]
        fixed = [f"model.name={name}", f"model.num_heads={heads}", f"model.depth={space.depth or depth}"]
        for p in grid_points(space.grid):
            out.append(Point(f"size={size},{p.name}", fixed + p.overrides + [f"train.micro_batch={micro}"]))
    return out


# --------------------------------------------------------------------------- the analysis


def _parabola_optimum(log_lr: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """The LR (log10) that minimises y: the vertex of a parabola through the best LR and its two neighbours,
    or the best grid value with ``edge`` = ``low`` / ``high`` when the best lies at the grid's edge."""
    order = np.argsort(log_lr)
    log_lr, y = log_lr[order], y[order]
    i = int(np.argmin(y))
    if len(y) < 3 or i in (0, len(y) - 1):
        return float(log_lr[i]), ("" if len(y) < 3 else ("low" if i == 0 else "high"))
    a, b, _ = np.polyfit(log_lr[i - 1:i + 2], y[i - 1:i + 2], 2)
    if a <= 0:  # flat or concave around the best: take the best grid value
        return float(log_lr[i]), ""
    return float(np.clip(-b / (2 * a), log_lr[i - 1], log_lr[i + 1])), ""


def analyse(rows: list[dict], metric: str, widths: dict[str, int], other_keys: list[str]) -> list[dict]:
    """Per size: the best row by ``metric`` and the optimum LR along the LR axis at its other values.

    Args:
        rows: ``sweep.csv`` rows with a ``size`` field added.
        widths: size -> width.
        other_keys: the grid keys besides the LR (and the seed, averaged over).
    """
    result = []
    for size in dict.fromkeys(r["size"] for r in rows):
        mine = [r for r in rows if r["size"] == size and r.get(metric) not in ("", None)]
        if not mine:
            raise ValueError(f"size {size}: no point has a {metric}; use --metric train_loss or evaluate the runs")
        by_config: dict[tuple, list[float]] = {}
        for r in mine:  # seeds averaged: the key has every grid value but the seed
            by_config.setdefault(tuple(str(r[k]) for k in ["train.lr", *other_keys]), []).append(float(r[metric]))
        mean = {k: float(np.mean(v)) for k, v in by_config.items()}
        best = min(mean, key=mean.get)
        along = [(float(k[0]), v) for k, v in mean.items() if k[1:] == best[1:]]
        log_lr, edge = _parabola_optimum(np.log10([a for a, _ in along]), np.array([v for _, v in along]))
        params = next(int(r["params"]) for r in mine)
        result.append({"size": size, "width": widths[size], "params": params, "best_lr": float(best[0]),
                       **{k: v for k, v in zip(other_keys, best[1:])}, metric: mean[best],
                       "seeds": len(by_config[best]), "lr_opt": 10 ** log_lr, "edge": edge})
    return result


def write_report(out: Path, best: list[dict], metric: str, other_keys: list[str], command: str,
                 rows: list[dict]) -> dict:
    """``lr_search.md``, ``lr_opt.csv``, the LR-in-width fit (``lr_fit/``, two sizes or more) and the plot."""
    from vitscale.tools.fit import report, run_fit

    lines = [f"# vit-l-search: the best point per model size by {metric}", "", f"`{command}`", "",
             "| size | width | params | best LR | " + " | ".join(other_keys) + f" | {metric} | seeds | optimum LR |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in other_keys) + " | ---: | ---: | ---: |"]
    for b in best:
        note = {"low": " (lowest LR searched: widen --lr down)", "high": " (highest LR searched: widen --lr up)"}
        lines.append(f"| {b['size']} | {b['width']} | {b['params'] / 1e6:.2f} M | {b['best_lr']:g} | "
                     + " | ".join(str(b[k]) for k in other_keys)
                     + f" | {b[metric]:.4f} | {b['seeds']} | {b['lr_opt']:.3g}{note.get(b['edge'], '')} |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["size", "width", "params", "lr", "edge"], lineterminator="\n")
    writer.writeheader()
    for b in best:
        writer.writerow({"size": b["size"], "width": b["width"], "params": b["params"], "lr": b["lr_opt"],
                         "edge": b["edge"]})
    write_text_atomic(out / "lr_opt.csv", buf.getvalue())
    fit, widths = None, sorted({b["width"] for b in best})
    if len(widths) == 2:  # two sizes: the slope between them, no interval
        (w0, l0), (w1, l1) = sorted((b["width"], b["lr_opt"]) for b in best)
        lines += ["", f"Optimum LR against width, from two sizes: lr* ~ width^-{math.log(l0 / l1) / math.log(w1 / w0):.3g} "
                      "(no interval: a third size gives the fitted exponent with its bootstrap interval)."]
    if len(widths) >= 3:
        fit = run_fit(out / "lr_opt.csv", "power", out / "lr_fit", x_cols=["width"], y_col="lr",
                      resamples=200)
        alpha, (lo, hi) = fit["params"]["alpha"], fit["ci95"]["alpha"]
        verdict = ("the optimum LR falls with width" if lo > 0 else "the optimum LR rises with width" if hi < 0
                   else "no shift of the optimum LR with width is resolved at this scale")
        lines += ["", f"Optimum LR against width: lr* = A / width^alpha, alpha = {alpha:.3g} "
                      f"(95% bootstrap [{lo:.3g}, {hi:.3g}], {len(best)} sizes): {verdict}.",
                  "An optimum at the edge of the LR grid bounds the fit's point there, no more.", "", "```",
                  report(fit).rstrip(), "```"]
    write_text_atomic(out / "lr_search.md", "\n".join(lines) + "\n")
    _plot(out / "lr_search.png", best, rows, metric, other_keys)
    return {"best": best, "fit": fit}


def _plot(path: Path, best: list[dict], rows: list[dict], metric: str, other_keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for b in best:
        at = [r for r in rows if r["size"] == b["size"] and r.get(metric) not in ("", None)
              and all(str(r[k]) == str(b[k]) for k in other_keys)]
        lrs = sorted({float(r["train.lr"]) for r in at})
        ys = [np.mean([float(r[metric]) for r in at if float(r["train.lr"]) == lr]) for lr in lrs]
        (line,) = left.plot(lrs, ys, "o-", label=f"{b['size']} (width {b['width']})")
        left.axvline(b["lr_opt"], color=line.get_color(), ls=":", lw=1)
    left.set_xscale("log")
    left.set_xlabel("train.lr")
    left.set_ylabel(metric)
    left.legend()
    left.set_title("at each size's best other values; dotted: optimum")
    right.loglog([b["width"] for b in best], [b["lr_opt"] for b in best], "o")
    right.set_xlabel("width")
    right.set_ylabel("optimum LR")
    right.set_title("optimum LR against width")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(args, overrides: list[str], command: str) -> int:
    """The recipe (module docstring); returns the exit code."""
    from vitscale.progress import progress_bar
    from vitscale.tools import grid as grids

    base = load_config(args.config, overrides)
    space = search_space(args.sizes, args.lr, args.batch, args.warmup, args.wd, args.grid or [], args.depth,
                         args.seeds, base.train.seed)
    pts = points(space, base.train.micro_batch)
    grids.check_points(str(args.config), overrides, pts)
    out = Path(args.out)
    if args.emit_sbatch:
        out.mkdir(parents=True, exist_ok=True)
        sys.stdout.write(grids.sbatch_array(str(args.config), overrides, pts, out, args.sbatch_script, command))
        return 0
    steps = {p.name: load_config(args.config, [*overrides, *p.overrides]).train.steps for p in pts}
    logger.info("vit-l-search: %d points (%d sizes x %s) into %s", len(pts), len(space.sizes),
                " x ".join(f"{k} ({len(v)})" for k, v in space.grid.items()), out)
    with progress_bar(sum(steps.values()), "vit-l-search", "step", args.progress) as bar:
        grids.run_points(str(args.config), overrides, pts, out, bar, lambda p: steps[p.name])
    keys = SIZE_KEYS + list(space.grid) + ["train.micro_batch"]
    table = grids.write_table(out, pts, keys)
    with open(table) as f:
        rows = list(csv.DictReader(f))
    by_name = {SIZES[s][0]: s for s in space.sizes}
    for r in rows:
        r["size"] = by_name[r["model.name"]]
    metric = args.metric or ("eval_loss" if all(r["eval_loss"] not in ("", None) for r in rows) else "train_loss")
    other = [k for k in space.grid if k not in ("train.lr", "train.seed")]
    best = analyse(rows, metric, {s: SIZES[s][1] for s in space.sizes}, other)
    write_report(out, best, metric, other, command, rows)
    print((out / "lr_search.md").read_text())
    logger.info("vit-l-search: wrote %s", ", ".join(str(out / n) for n in ("sweep.csv", "lr_search.md",
                                                                              "lr_opt.csv", "lr_search.png")))
    return 0


def add_parser(sub) -> None:
    """The recipe's sub-command of ``vitscale-recipe``."""
    from vitscale.progress import add_progress_flags

    p = sub.add_parser("vit-l-search", help="LR x batch x warm-up x weight decay over a ViT size ladder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    p.add_argument("--config", default=None, help="base config (default configs/vit_tiny.yaml)")
    p.add_argument("--sizes", default="ti,s,b", help=f"model sizes, from {','.join(SIZES)} (default ti,s,b)")
    p.add_argument("--lr", default="3e-4,1e-3,3e-3", help="train.lr values")
    p.add_argument("--batch", default="32", help="train.global_batch values")
    p.add_argument("--warmup", default="10", help="optim.warmup_steps values")
    p.add_argument("--wd", default="0.05", help="optim.weight_decay values")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a further grid axis, e.g. "
                   "optim.name=adamw,lion or model.qk_norm=true,false (repeatable)")
    p.add_argument("--depth", type=int, help="cap every size at this depth (CPU scale); default: each size's own")
    p.add_argument("--seeds", type=int, help="seeds per point (averaged in the report)")
    p.add_argument("--metric", choices=["train_loss", "eval_loss"], help="what 'best' minimises (default "
                   "eval_loss where every run evaluated, else train_loss)")
    p.add_argument("--out", type=Path, default=Path("runs/vit_l_search"))
    p.add_argument("--emit-sbatch", action="store_true", help="run nothing: print one SLURM array job of the points")
    p.add_argument("--sbatch-script", default="launch/slurm/juwels_booster.sbatch")
    add_progress_flags(p)


def main_args(args) -> int:
    """Run from parsed ``vitscale-recipe vit-l-search`` arguments."""
    from vitscale.config import find_config

    args.config = find_config(args.config or "vit_tiny")
    command = "vitscale-recipe vit-l-search " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    try:
        return run(args, args.overrides, command)
    except (ConfigError, RuntimeError, ValueError) as e:
        logger.error("vit-l-search: %s", e)
        return 2
