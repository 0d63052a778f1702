"""``vitscale-scaling RUN_DIR... [--mode strong|weak] [--out DIR]``: scaling tables from run folders.

Reads the last ``kind: throughput, scope: global`` record of each run's ``metrics.jsonl``
and writes, into ``--out``:

- ``scaling.md``: ``# Nodes | # Devices | global batch | samples/s | samples/s per device |
  efficiency | MFU | node spread`` (the table of the OpenCLIP / GPT-NeoX scaling reports),
- ``scaling.csv``: the same numbers unrounded, one row per run,
- ``scaling.png``: samples/s and efficiency against devices, the ideal line drawn.

Efficiency is against the run with the fewest devices: samples/s per device divided by
that run's. For strong scaling (fixed global batch) this is speed-up / device ratio, for
weak scaling (fixed batch per device) it is the step-time ratio; the mode decides which
batch must stay fixed across the runs, and a set of runs that breaks it is refused.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Mode = Literal["strong", "weak"]
COLUMNS = ["nodes", "devices", "global_batch", "samples_per_s", "samples_per_s_per_device", "efficiency", "mfu",
           "node_spread", "slowest_host", "run"]


def last_global_record(run_dir: str | Path) -> dict:
    """The run's last global throughput record; ValueError naming the run if it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl; give run folders written by vitscale-train (run.dir)")
    found = None
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("kind") == "throughput" and rec.get("scope") == "global":
                found = rec
    if found is None:
        raise ValueError(f"{path} holds no throughput record of scope global; train for more steps than "
                         f"log.warmup_steps (and at least log.every)")
    return found


def scaling_rows(runs: dict[str, dict], mode: Mode = "strong") -> list[dict]:
    """Rows of the table, by device count, with efficiency against the smallest run.

    Args:
        runs: {run name: its last global throughput record}.
        mode: strong (the global batch must be the same in every run) or weak (the batch per device).

    Returns:
        One dict per run with the keys of ``COLUMNS``.
    """
    if not runs:
        raise ValueError("no runs given; pass one or more run folders")
    models = {rec.get("model") for rec in runs.values()}
    if len(models) > 1:
        raise ValueError(f"the runs train different models ({', '.join(sorted(map(str, models)))}); "
                         "a scaling table compares one model")
    fixed = {name: rec["global_batch"] if mode == "strong" else rec["global_batch"] / rec["devices"]
             for name, rec in runs.items()}
    if len(set(fixed.values())) > 1:
        what = "global batch" if mode == "strong" else "batch per device"
        other = "weak" if mode == "strong" else "strong"
        listing = ", ".join(f"{name}: {value:g}" for name, value in fixed.items())
        raise ValueError(f"--mode {mode} keeps the {what} fixed, but the runs differ ({listing}); "
                         f"pass --mode {other} or runs with one {what}")
    order = sorted(runs, key=lambda name: (runs[name]["devices"], name))
    base = runs[order[0]]["samples_per_s_per_device"]
    rows = []
    for name in order:
        rec = runs[name]
        rows.append({"nodes": rec["nodes"], "devices": rec["devices"], "global_batch": rec["global_batch"],
                     "samples_per_s": rec["samples_per_s"],
                     "samples_per_s_per_device": rec["samples_per_s_per_device"],
                     "efficiency": rec["samples_per_s_per_device"] / base if base > 0 else 0.0,
                     "mfu": rec.get("mfu"), "node_spread": rec.get("node_spread"),
                     "slowest_host": rec.get("slowest_host"), "run": name})
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_table(rows: list[dict], mode: Mode, model: str) -> str:
    """The Markdown table (with a one-line caption) of ``scaling_rows``."""
    fixed = f"global batch {rows[0]['global_batch']}" if mode == "strong" else \
        f"batch {rows[0]['global_batch'] / rows[0]['devices']:g} per device"
    lines = [f"{mode.capitalize()} scaling of {model} ({fixed}); efficiency against {rows[0]['devices']} device(s).",
             "",
             "| # Nodes | # Devices | global batch | samples/s | samples/s per device | efficiency | MFU | node spread |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['devices']} | {r['global_batch']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s_per_device']:.2f} | {_pct(r['efficiency'])} | {_pct(r['mfu'])} | "
                     f"{_pct(r['node_spread'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """samples/s (with the ideal line from the smallest run) and efficiency against devices."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    devices = [r["devices"] for r in rows]
    ideal = [rows[0]["samples_per_s"] * d / devices[0] for d in devices]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(devices, [r["samples_per_s"] for r in rows], "o-", label="measured")
    left.plot(devices, ideal, "--", color="grey", label="ideal (linear)")
    left.set(xlabel="devices", ylabel="samples/s", title="throughput")
    right.plot(devices, [100 * r["efficiency"] for r in rows], "o-")
    right.axhline(100, ls="--", color="grey")
    right.set(xlabel="devices", ylabel="efficiency (%)", title="efficiency",
              ylim=(0, max(110, 10 + max(100 * r["efficiency"] for r in rows))))
    for ax in (left, right):
        if len(set(devices)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(devices)), [str(d) for d in sorted(set(devices))])
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tables(run_dirs: list[str], out: str | Path, mode: Mode = "strong") -> list[dict]:
    """Read the runs, write scaling.md / .csv / .png into ``out``; returns the rows."""
    runs = {str(d): last_global_record(d) for d in run_dirs}
    rows = scaling_rows(runs, mode)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(next(iter(runs.values())).get("model"))
    (out / "scaling.md").write_text(markdown_table(rows, mode, model))
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "scaling.png", f"{mode} scaling, {model}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale-scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.dir of vitscale-train)")
    ap.add_argument("--mode", choices=["strong", "weak"], default="strong",
                    help="strong: one global batch for all runs; weak: one batch per device (default strong)")
    ap.add_argument("--out", default=".", help="folder for scaling.md, scaling.csv, scaling.png (default .)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_tables(args.runs, args.out, args.mode)
    except ValueError as e:
        logger.error("vitscale-scaling: %s", e)
        return 2
    sys.stdout.write((Path(args.out) / "scaling.md").read_text())
    logger.info("wrote %s/scaling.md, scaling.csv, scaling.png", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
