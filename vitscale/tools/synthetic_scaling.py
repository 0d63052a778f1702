"""``vitscale-recipe synthetic-scaling``: how much synthetic data buys how much downstream accuracy.

    vitscale-recipe synthetic-scaling [--generator fractal] [--images 1000,4000,16000,64000]
                                      [--instances 10,100] [--classes 100] [--sizes ti] [--depth 6]
                                      [--finetune-steps 200] [--seeds 1] [--seed 0] [--out DIR]

The synthetic-data scaling-law work fits loss against synthetic data and asks how much synthetic
data buys the loss of real data. Here every point pre-trains a ViT on one generator (rendered on
the fly, ``data.instances`` images per class, ``--classes`` classes) until it has seen ``--images``
synthetic images (steps = images / batch), then fine-tunes it on digits exactly as
``vitscale-recipe fdsl-transfer`` does (same DeiT recipe, steps and seed for every point); each
size also fine-tunes from scratch once per seed, the reference with no synthetic image. Points
run one after another in one process group; a finished point (``done.json``) is skipped when the
recipe runs again.

It writes into ``--out``:

- ``synthetic_scaling.csv``: a row per point: size, params, generator, classes, instances,
  ``images`` (synthetic images seen), seed, the pre-training's final loss, the fine-tuned model's
  test ``loss`` (cross-entropy), ``top1`` and ``top1_error`` (1 - top-1);
- ``fits/<size>_c<classes>_i<instances>_<y>/``: ``vitscale-fit``'s data law L(D) = B / D^beta + E
  of the fine-tuned test loss and of the top-1 error against images seen, per curve with four
  image counts or more (bootstrap 95 % intervals);
- ``synthetic_scaling.md``: the table, each fit with its intervals, and the synthetic images a
  curve needs to reach the scratch reference's loss (where it does).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import shlex
import sys
from pathlib import Path

from vitscale.files import write_text_atomic

logger = logging.getLogger(__name__)

COLUMNS = ["size", "params", "generator", "classes", "instances", "images", "seed", "pretrain_steps",
           "pretrain_loss", "finetune_steps", "loss", "top1", "top1_error"]
DONE = "done.json"


def parse_counts(text: str, what: str, low: int = 1) -> list[int]:
    """``1000,4000`` -> [1000, 4000] (``1e3`` allowed); ValueError naming ``what`` otherwise."""
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text}: give comma-separated integers, e.g. --{what} 1000,4000") from None
    if not values or min(values) < low or len(set(values)) < len(values):
        raise ValueError(f"--{what} {text}: distinct integers of at least {low}")
    return sorted(values)


def point_name(size: str, classes: int, instances: int, images: int, seed: int) -> str:
    return f"{size}_c{classes}_i{instances}_n{images}_s{seed}"


def curves(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows with synthetic images grouped by (size, classes, instances): one data-law curve each."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if int(r["images"]) > 0:
            out.setdefault((r["size"], int(r["classes"]), int(r["instances"])), []).append(r)
    return out


def fit_curves(rows: list[dict], out: Path, resamples: int = 200, ys: tuple[str, ...] = ("loss", "top1_error")
               ) -> list[dict]:
    """The data law of the test loss and of the top-1 error against images seen, per curve of 4+ image counts."""
    from vitscale.tools.fit import run_fit

    fits = []
    for (size, classes, instances), mine in curves(rows).items():
        if len({int(r["images"]) for r in mine}) < 4:
            logger.info("synthetic-scaling: %s c%d i%d has fewer than 4 image counts: no fit", size, classes,
                        instances)
            continue
        for y in ys:
            folder = out / "fits" / f"{size}_c{classes}_i{instances}_{y}"
            folder.mkdir(parents=True, exist_ok=True)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["samples", y], lineterminator="\n")
            writer.writeheader()
            for r in mine:
                if float(r[y]) > 0:  # a perfect top-1 has no error to take the log of
                    writer.writerow({"samples": r["images"], y: r[y]})
            write_text_atomic(folder / "points.csv", buf.getvalue())
            try:
                result = run_fit(folder / "points.csv", "data", folder, x_cols=["samples"], y_col=y,
                                 resamples=resamples)
            except ValueError as e:  # too few usable points (e.g. zero errors)
                logger.info("synthetic-scaling: no fit of %s for %s c%d i%d: %s", y, size, classes, instances, e)
                continue
            fits.append({"size": size, "classes": classes, "instances": instances, "y": y, "fit": result})
    return fits


def images_to_reach(params: dict, target: float) -> float | None:
    """D with B / D^beta + E = target (None when the target lies at or below the floor E)."""
    if target <= params["E"]:
        return None
    return (params["B"] / (target - params["E"])) ** (1 / params["beta"])


def write_report(out: Path, rows: list[dict], fits: list[dict], command: str) -> Path:
    """``synthetic_scaling.csv`` and ``.md``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "synthetic_scaling.csv", buf.getvalue())
    lines = ["# Synthetic images seen against downstream loss and top-1 error", "", f"`{command}`", "",
             "| size | params | generator | classes | instances | images seen | seed | pre-train loss | test loss | "
             "top-1 |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pre = "–" if r["pretrain_loss"] in ("", None) else f"{float(r['pretrain_loss']):.3f}"
        lines.append(f"| {r['size']} | {int(r['params']) / 1e6:.2f} M | {r['generator']} | {r['classes']} | "
                     f"{r['instances']} | {r['images']} | {r['seed']} | {pre} | {float(r['loss']):.4f} | "
                     f"{float(r['top1']):.1f} |")
    scratch = {}
    for r in rows:
        if int(r["images"]) == 0:
            scratch.setdefault(r["size"], []).append(float(r["loss"]))
    for f in fits:
        p, ci = f["fit"]["params"], f["fit"]["ci95"]
        what = "test loss" if f["y"] == "loss" else "top-1 error"
        lines += ["", f"**{f['size']}, {f['classes']} classes x {f['instances']} instances, {what}:** "
                      f"L(D) = B / D^beta + E with " + ", ".join(
                          f"{k} = {v:.4g} [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" for k, v in p.items())
                  + f" ({f['fit']['points']} points, rms log residual {f['fit']['rms_log_residual']:.3f})."]
        if ci["beta"][0] <= 0:
            lines.append("beta's interval reaches 0 or below: no decrease with more synthetic images is resolved by "
                         "these points.")
        elif f["y"] == "loss" and f["size"] in scratch:
            target = sum(scratch[f["size"]]) / len(scratch[f["size"]])
            need = images_to_reach(p, target)
            lines.append(f"Scratch's test loss {target:.4f} is reached after "
                         + (f"{need:,.0f} synthetic images by the fit." if need is not None else
                            "no number of synthetic images by the fit (it lies below the fitted floor E)."))
    path = out / "synthetic_scaling.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def run(args, command: str) -> int:
    """The recipe (module docstring)."""
    from vitscale.config import find_config, load_config
    from vitscale.data.synthetic import list_generators
    from vitscale.models.spec import resolve_model
    from vitscale.tools.fdsl_transfer import FULL, Plan, Runner, finetune_overrides, pretrain_overrides, read_records
    from vitscale.tools.lr_search import SIZES

    if args.generator not in list_generators():
        raise ValueError(f"--generator {args.generator}: choose one of {', '.join(list_generators())}")
    images = parse_counts(args.images, "images")
    instances = parse_counts(args.instances, "instances")
    classes = parse_counts(args.classes, "classes", low=2)
    if 10 in classes:
        raise ValueError("--classes 10 is the digits' count: the pre-trained head would be kept, not replaced; "
                         "use another count")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        raise ValueError(f"--sizes {args.sizes}: choose from {', '.join(SIZES)}")
    base = Plan(**{**FULL.__dict__, "depth": args.depth, "finetune_steps": args.finetune_steps})
    out, runner = Path(args.out), None  # the process group starts with the first point that trains
    pretrain_cfg, finetune_cfg = find_config("vit_tiny"), find_config("vit_tiny_finetune")
    rows = []
    for k in range(args.seeds):
        seed = args.seed + k
        for size in sizes:
            name, _, heads, _ = SIZES[size]
            model = [f"model.name={name}", f"model.num_heads={heads}"]
            for c, i, n in [(0, 0, 0)] + [(c, i, n) for c in classes for i in instances for n in images]:
                folder = out / "runs" / point_name(size, c, i, n, seed)
                done = folder / DONE
                if done.is_file():
                    rows.append(json.loads(done.read_text()))
                    continue
                runner = runner or Runner()
                steps = math.ceil(n / base.batch)
                plan = Plan(**{**base.__dict__, "classes": c or base.classes, "pretrain_steps": steps})
                init, loss = None, ""
                if n:
                    init = runner.train(pretrain_cfg, pretrain_overrides(plan, args.generator, steps,
                                                                         folder / "pretrain", seed)
                                        + model + [f"data.instances={i}"])
                    loss = read_records(init, "train")[-1]["loss"]
                tuned = runner.train(finetune_cfg, finetune_overrides(plan, init, plan.finetune_steps,
                                                                      folder / "finetune", seed) + model)
                last = read_records(tuned, "eval")[-1]
                cfg = load_config(tuned / "config.yaml")
                params = resolve_model(cfg.model, cfg.data.image_size, cfg.data.num_classes, cfg.train.loss).parameters
                row = {"size": size, "params": params, "generator": args.generator if n else "scratch",
                       "classes": c, "instances": i, "images": n, "seed": seed, "pretrain_steps": steps if n else 0,
                       "pretrain_loss": loss, "finetune_steps": plan.finetune_steps, "loss": last["loss"],
                       "top1": last["top1"], "top1_error": 1 - last["top1"] / 100}
                if runner.dims.is_main:
                    write_text_atomic(done, json.dumps(row) + "\n")
                rows.append(row)
    # Every point finished before: no process group; each rank (one, unless launched) writes the same report.
    if runner is None or runner.dims.is_main:
        fits = fit_curves(rows, out, args.bootstrap)
        path = write_report(out, rows, fits, command)
        print(path.read_text())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("synthetic-scaling", help="synthetic images seen against downstream loss and top-1 error",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--generator", default="fractal", help="the synthetic source (vitscale-synth list)")
    p.add_argument("--images", default="1000,4000,16000,64000", help="synthetic images seen in pre-training")
    p.add_argument("--instances", default="10,100", help="data.instances: images per class")
    p.add_argument("--classes", default="100", help="pre-training classes")
    p.add_argument("--sizes", default="ti", help="ViT widths from the ladder (ti, s, b, l, h); --depth blocks each")
    p.add_argument("--depth", type=int, default=6, help="blocks of every size (default 6, the FDSL recipe's)")
    p.add_argument("--finetune-steps", type=int, default=200, help="fine-tuning steps on digits per point")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of each fit's intervals")
    p.add_argument("--out", type=Path, default=Path("runs/synthetic_scaling"))


def main_args(args) -> int:
    command = "vitscale-recipe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.seeds < 1 or args.depth < 1 or args.finetune_steps < 1:
        logger.error("synthetic-scaling: --seeds, --depth and --finetune-steps must be at least 1")
        return 2
    try:
        code = run(args, command)
    except ValueError as e:
        logger.error("synthetic-scaling: %s", e)
        return 2
    from vitscale.distributed import shutdown

    shutdown()
    return code
