"""``vitscale-plot RUN_DIR... [--out DIR] [--x step|samples|flops|time]``: PNGs of runs and sweeps.

Reads each run folder's ``metrics.jsonl`` (and its ``config.yaml``) and writes, into ``--out``
(default ``RUN_DIR/plots`` for one folder, ``plots`` for several):

- ``loss.png``: training loss; ``eval.png``: every evaluation figure (when the runs evaluated),
- ``lr.png``, ``grad_norm.png``,
- ``throughput.png``: samples/s of the whole run, then per node, then each node's own pace
  (forward samples/s, or steps/s for pipelines: what ``train/throughput.py`` judges stragglers
  by, with its threshold ``log.straggler_fraction`` x the median node's dashed); the nodes the
  run's global records named stragglers are marked with red crosses,
- ``mfu.png``: TFLOP/s per device and MFU (n/a without a known peak, e.g. on CPU),
- ``data_wait.png``: the fraction of step time spent waiting for data, global and per node,
- ``data.png`` (image-text shards): the samples read that were kept, filtered, duplicate or bad,
- ``overview.png``: loss, LR, grad norm, samples/s, MFU and data wait on one sheet.

Runs are overlaid, each labelled by the config keys whose values differ between the runs
(``train.lr=0.001``; the folder name when none differ). ``--x`` picks the horizontal axis:
optimizer step, samples seen, training FLOPs (3 x forward FLOPs per sample, from the runs'
throughput records) or wall time since the first timed step. A resumed run's repeated steps
replace the earlier ones.

A ``vitscale-sweep --out`` folder (run folders ``p1/``, ``p2/``, ... or ``n1/``, ... inside) also
gets ``sweep.png``: the sweep's points, samples/s against devices with the ideal line, scaling
efficiency and MFU (``tools/scaling.py``'s table rows; strong or weak scaling read from the
runs' batches); its runs' curves are overlaid as well.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from vitscale.tools.scaling import last_global_record, scaling_rows
from vitscale.train.throughput import read_metrics

logger = logging.getLogger(__name__)

X_AXES = ("step", "samples", "flops", "time")
X_LABELS = {"step": "optimizer step", "samples": "samples seen", "flops": "training FLOPs",
            "time": "wall time since the first timed step (s)"}
IGNORED_KEYS = ("run.dir",)  # differ between any two runs; say nothing about them
MAX_LABEL_KEYS = 3
STRAGGLER = {"marker": "x", "color": "red", "markersize": 9, "mew": 2, "ls": "none"}


class PlotError(ValueError):
    """Folders that cannot be plotted; the message names the folder and what is missing."""


@dataclass
class RunData:
    """One run folder: its flattened config and its records, a resume's repeated steps replaced."""

    path: Path
    config: dict  # dotted key -> value, from config.yaml ({} without one)
    records: list[dict]
    label: str = ""
    _times: tuple | None = field(default=None, repr=False)

    def of(self, kind: str, scope: str | None = None, node: int | None = None) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind and (scope is None or r.get("scope") == scope)
                and (node is None or r.get("node") == node)]

    @property
    def global_batch(self) -> int:
        batch = self.config.get("train.global_batch")
        if batch is None:
            train = self.of("train")
            batch = train[0]["samples"] // train[0]["step"] if train and train[0].get("step") else 1
        return int(batch)

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (3 x forward), from a throughput record (TFLOP/s and samples/s per device)."""
        for r in self.of("throughput", "global"):
            if r.get("samples_per_s_per_device"):
                return r["tflops_per_device"] * 1e12 / r["samples_per_s_per_device"]
        raise PlotError(f"{self.path}: --x flops needs a throughput record (train longer than log.warmup_steps)")

    def time_of(self, step: float) -> float:
        """Seconds since the first timed step at ``step``, interpolated between the throughput records'
        times (train and eval records carry none)."""
        import numpy as np

        if self._times is None:
            glob = self.of("throughput", "global")
            if not glob:
                raise PlotError(f"{self.path}: --x time needs a throughput record (train longer than "
                                "log.warmup_steps)")
            first = glob[0]
            t0 = first["time"] - first["elapsed"]
            steps = [first["step"] - first.get("measured_steps", 0)] + [r["step"] for r in glob]
            self._times = (steps, [0.0] + [r["time"] - t0 for r in glob])
        return float(np.interp(step, *self._times))

    def x(self, record: dict, axis: str) -> float:
        step = record["step"]
        if axis == "step":
            return step
        if axis == "samples":
            return step * self.global_batch
        if axis == "flops":
            return step * self.global_batch * self.flops_per_sample()
        return self.time_of(step)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> {dotted key: value} (lists stay values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def latest(records: list[dict]) -> list[dict]:
    """Records with a resumed run's repeated steps replaced: within each series (kind, scope, node), a
    record at a step at or before the series' last drops the earlier ones from that step on."""
    series: dict[tuple, list[dict]] = {}
    for r in records:
        if "step" not in r:
            continue
        kept = series.setdefault((r.get("kind"), r.get("scope"), r.get("node")), [])
        while kept and kept[-1]["step"] >= r["step"]:
            kept.pop()
        kept.append(r)
    order = {id(r): i for i, r in enumerate(records)}
    return sorted((r for kept in series.values() for r in kept), key=lambda r: order[id(r)])


def _value(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def run_labels(configs: list[dict], names: list[str]) -> list[str]:
    """A legend label per run: ``key=value`` of the config keys whose values differ between the runs
    (``run.dir`` left out; at most ``MAX_LABEL_KEYS``, then how many more), or the folder name where
    none differ or two labels would be the same.

    Args:
        configs: each run's flattened config (``flatten`` of its config.yaml).
        names: each run's folder name.
    """
    keys = sorted({k for c in configs for k in c} - set(IGNORED_KEYS))
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    labels = []
    for config, name in zip(configs, names):
        parts = [f"{k}={_value(config.get(k))}" for k in differ[:MAX_LABEL_KEYS]]
        if len(differ) > MAX_LABEL_KEYS:
            parts.append(f"+{len(differ) - MAX_LABEL_KEYS} more keys")
        labels.append(", ".join(parts) or name)
    if len(set(labels)) < len(labels):
        labels = [f"{name}: {label}" if label != name else name for label, name in zip(labels, names)]
    return labels


def load_run(path: Path) -> RunData:
    try:
        records = read_metrics(path)
    except FileNotFoundError as e:
        raise PlotError(str(e)) from None
    if not any(r.get("kind") == "train" for r in records):
        raise PlotError(f"{path}/metrics.jsonl holds no train record yet; a run writes one every log.every steps")
    config_file = path / "config.yaml"
    config = flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
    return RunData(path, config, latest(records))


def find_runs(paths: list[str]) -> tuple[list[RunData], list[list[RunData]]]:
    """Run folders and sweep folders (folders whose sub-folders are runs) -> (every run, each sweep's runs)."""
    runs, sweeps, names = [], [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise PlotError(f"{p}: no such folder")
        if (p / "metrics.jsonl").is_file():
            runs.append(load_run(p))
            names.append(p.resolve().name)
            continue
        inner = sorted((c for c in p.iterdir() if (c / "metrics.jsonl").is_file()), key=_sweep_order)
        if not inner:
            raise PlotError(f"{p}: no metrics.jsonl here or in its sub-folders; give run folders written by "
                            "vitscale-train (run.dir) or a vitscale-sweep --out folder")
        sweep = [load_run(c) for c in inner]
        runs += sweep
        names += [f"{p.resolve().name}/{c.name}" for c in inner]
        sweeps.append(sweep)
    labels = run_labels([r.config for r in runs], names)
    for run, label in zip(runs, labels):
        run.label = label
    return runs, sweeps


def _sweep_order(path: Path) -> tuple:
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return (int(digits) if digits else 0, path.name)


# -- drawing: each panel is a function of (axes, runs, x axis) -------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[RunData]) -> dict[int, str]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {id(r): cycle[i % len(cycle)] for i, r in enumerate(runs)}


def _line(ax, runs: list[RunData], axis: str, kind: str, value: str, scope: str | None = None,
          scale: float = 1.0) -> bool:
    """One line per run of ``value`` in its ``kind`` records; whether anything was drawn."""
    colors, drawn = _colors(runs), False
    for run in runs:
        rows = [r for r in run.of(kind, scope) if r.get(value) is not None]
        if rows:
            ax.plot([run.x(r, axis) for r in rows], [scale * r[value] for r in rows], label=run.label,
                    color=colors[id(run)], marker="." if len(rows) < 30 else None)
            drawn = True
    return drawn


def _finish(ax, axis: str, title: str, ylabel: str, drawn: bool, empty: str = "no records") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel=X_LABELS[axis], ylabel=ylabel)
    ax.grid(alpha=0.3)
    if axis == "step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not drawn:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="grey")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def draw_loss(ax, runs, axis):
    drawn = _line(ax, runs, axis, "train", "loss")
    _finish(ax, axis, "training loss", "loss", drawn)


def draw_lr(ax, runs, axis):
    drawn = _line(ax, runs, axis, "train", "lr")
    _finish(ax, axis, "learning rate", "lr", drawn)


def draw_grad_norm(ax, runs, axis):
    drawn = _line(ax, runs, axis, "train", "grad_norm")
    _finish(ax, axis, "gradient norm", "norm", drawn, "no gradient norm recorded")


def draw_samples_per_s(ax, runs, axis):
    drawn = _line(ax, runs, axis, "throughput", "samples_per_s", "global")
    _finish(ax, axis, "samples/s (whole run)", "samples/s", drawn, "no throughput record (train past log.warmup_steps)")


def draw_mfu(ax, runs, axis):
    drawn = _line(ax, runs, axis, "throughput", "mfu", "global", scale=100.0)
    _finish(ax, axis, "MFU", "MFU (%)", drawn, "MFU n/a: no peak TFLOP/s known\nfor the device (log.peak_tflops)")


def draw_tflops(ax, runs, axis):
    drawn = _line(ax, runs, axis, "throughput", "tflops_per_device", "global")
    _finish(ax, axis, "model TFLOP/s per device", "TFLOP/s", drawn, "no throughput record")


def draw_data_wait(ax, runs, axis):
    drawn = _line(ax, runs, axis, "throughput", "data_wait_fraction", "global", scale=100.0)
    colors = _colors(runs)
    for run in runs:
        nodes = _nodes(run)
        for node, rows in sorted(nodes.items()) if len(nodes) > 1 else ():
            ax.plot([run.x(r, axis) for r in rows], [100 * r["data_wait_fraction"] for r in rows], ls=":",
                    color=colors[id(run)], label=f"{run.label}: {rows[0].get('hostname', node)}")
    _finish(ax, axis, "waiting for data", "% of step time", drawn, "no throughput record")


def _nodes(run: RunData) -> dict[int, list[dict]]:
    nodes: dict[int, list[dict]] = {}
    for r in run.of("throughput", "node"):
        nodes.setdefault(r["node"], []).append(r)
    return nodes


def _straggler_steps(run: RunData) -> dict[str, set[int]]:
    """host -> the steps at which the run's global records named it a straggler (``train/throughput.py``)."""
    named: dict[str, set[int]] = {}
    for r in run.of("throughput", "global"):
        for host in r.get("stragglers") or []:
            named.setdefault(host, set()).add(r["step"])
    return named


def draw_nodes(ax, runs, axis, value: str = "samples_per_s", threshold: bool = False):
    """One line per node of each run; stragglers marked. ``value``: a node record field, or "pace"
    (the field the run judged stragglers by)."""
    colors, drawn, marked, named_threshold = _colors(runs), False, False, False
    styles = ["-", "--", "-.", ":"]
    for run in runs:
        named = _straggler_steps(run)
        basis = next((r.get("straggler_basis") for r in run.of("throughput", "global")), None) or "fwd_samples_per_s"
        field_ = basis if value == "pace" else value
        for i, (node, rows) in enumerate(sorted(_nodes(run).items())):
            rows = [r for r in rows if r.get(field_) is not None]
            if not rows:
                continue
            host = rows[0].get("hostname", f"node {node}")
            ax.plot([run.x(r, axis) for r in rows], [r[field_] for r in rows], ls=styles[i % len(styles)],
                    color=colors[id(run)], label=f"{run.label}: {host}" if len(runs) > 1 else host)
            slow = [r for r in rows if r["step"] in named.get(host, ())]
            if slow:
                ax.plot([run.x(r, axis) for r in slow], [r[field_] for r in slow], **STRAGGLER,
                        label="_nolegend_" if marked else "straggler")
                marked = True
            drawn = True
        if threshold and drawn:
            fraction = run.config.get("log.straggler_fraction", 0.8) or 0.0
            by_step: dict[int, list[float]] = {}
            for rows in _nodes(run).values():
                for r in rows:
                    if r.get(basis) is not None:
                        by_step.setdefault(r["step"], []).append(r[basis])
            steps = sorted(by_step)
            if fraction and steps:
                ax.plot([run.x({"step": s}, axis) for s in steps],
                        [fraction * statistics.median(by_step[s]) for s in steps], ls="--", color="grey", lw=1,
                        label="_nolegend_" if named_threshold else f"{fraction:g} x median node")
                named_threshold = True
    if value == "pace":
        ylabel, title = "pace", "node pace (forward samples/s; pipelines: steps/s)"
    else:
        ylabel, title = "samples/s", "samples/s per node (work its own ranks did)"
    _finish(ax, axis, title, ylabel, drawn, "no node records")


DATA_SHARES = {"kept": "-", "filtered": "--", "duplicate": "-.", "bad": ":"}  # counter -> line style


def draw_data(ax, runs, axis):
    """A counting source's ``data`` records (image-text shards): kept, filtered, duplicate and bad
    samples as a share of those read, cumulative."""
    colors, drawn = _colors(runs), False
    for run in runs:
        rows = [r for r in run.of("data") if r.get("read")]
        for counter, style in DATA_SHARES.items():
            if rows and counter in rows[0]:
                ax.plot([run.x(r, axis) for r in rows], [100 * r[counter] / r["read"] for r in rows], ls=style,
                        color=colors[id(run)], label=f"{run.label}: {counter}" if len(runs) > 1 else counter)
                drawn = True
    _finish(ax, axis, "samples read: kept, filtered, duplicate, bad", "% of samples read", drawn, "no data records")


def draw_mfu_or_tflops(ax, runs, axis):
    """MFU where the runs know their peak; else the TFLOP/s per device (CPU runs)."""
    if any(r.get("mfu") is not None for run in runs for r in run.of("throughput", "global")):
        draw_mfu(ax, runs, axis)
    else:
        draw_tflops(ax, runs, axis)


PANELS: dict[str, Callable] = {"loss": draw_loss, "lr": draw_lr, "grad_norm": draw_grad_norm,
                               "samples_per_s": draw_samples_per_s, "mfu": draw_mfu_or_tflops,
                               "data_wait": draw_data_wait}


def _eval_metrics(runs: list[RunData]) -> list[str]:
    names = []
    for run in runs:
        for r in run.of("eval"):
            names += [k for k, v in r.items() if k not in ("kind", "step", "time") and isinstance(v, (int, float))
                      and not isinstance(v, bool) and not k.endswith("samples") and k not in names]  # not counts
    return names


def _save(fig, path: Path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def plot_runs(runs: list[RunData], out: Path, axis: str = "step") -> list[Path]:
    """The run plots (module docstring) into ``out``; returns the files written."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("loss", "lr", "grad_norm"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        PANELS[name](ax, runs, axis)
        written.append(_save(fig, out / f"{name}.png"))
    metrics = _eval_metrics(runs)
    if metrics:
        cols = min(3, len(metrics))
        rows = -(-len(metrics) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            drawn = _line(ax, runs, axis, "eval", metric, scale=1.0)
            _finish(ax, axis, metric, metric, drawn)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        written.append(_save(fig, out / "eval.png", "evaluation"))
    if any(run.of("data") for run in runs):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw_data(ax, runs, axis)
        written.append(_save(fig, out / "data.png"))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    draw_samples_per_s(axes[0], runs, axis)
    draw_nodes(axes[1], runs, axis)
    draw_nodes(axes[2], runs, axis, "pace", threshold=True)
    written.append(_save(fig, out / "throughput.png", "throughput"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    draw_tflops(axes[0], runs, axis)
    draw_mfu(axes[1], runs, axis)
    written.append(_save(fig, out / "mfu.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_data_wait(ax, runs, axis)
    written.append(_save(fig, out / "data_wait.png"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, panel in zip(axes.flat, PANELS.values()):
        panel(ax, runs, axis)
    written.append(_save(fig, out / "overview.png"))
    return written


def sweep_rows(sweep: list[RunData]) -> tuple[list[dict], str]:
    """``tools/scaling.py``'s rows of a sweep's runs and its mode: strong when every run has one global
    batch, weak when every run has one batch per device."""
    records = {run.label: last_global_record(run.path) for run in sweep}
    errors = []
    for mode in ("strong", "weak"):
        try:
            return scaling_rows(records, mode), mode
        except ValueError as e:
            errors.append(str(e))
    raise PlotError(f"{sweep[0].path.parent}: the sweep's runs keep neither the global batch nor the batch per "
                    f"device fixed ({errors[0]})")


def plot_sweep(sweep: list[RunData], path: Path, rows: list[dict], mode: str) -> Path:
    """``sweep.png``: samples/s against devices (ideal line from the smallest run), efficiency, MFU;
    ``rows`` and ``mode`` from ``sweep_rows``."""
    plt = _pyplot()
    devices = [r["devices"] for r in rows]
    fig, (speed, eff, mfu) = plt.subplots(1, 3, figsize=(15, 4.5))
    speed.plot(devices, [r["samples_per_s"] for r in rows], "o-", label="measured")
    speed.plot(devices, [rows[0]["samples_per_s"] * d / devices[0] for d in devices], "--", color="grey",
               label="ideal (linear)")
    for r in rows:
        speed.annotate(r["run"], (r["devices"], r["samples_per_s"]), textcoords="offset points", xytext=(4, 4),
                       fontsize="small")
    speed.set(xlabel="devices", ylabel="samples/s", title="throughput")
    speed.legend(fontsize="small")
    eff.plot(devices, [100 * r["efficiency"] for r in rows], "o-")
    eff.axhline(100, ls="--", color="grey")
    eff.set(xlabel="devices", ylabel="efficiency (%)", title=f"{mode} scaling efficiency",
            ylim=(0, max(110, 10 + max(100 * r["efficiency"] for r in rows))))
    known = [r for r in rows if r["mfu"] is not None]
    if known:
        mfu.plot([r["devices"] for r in known], [100 * r["mfu"] for r in known], "o-")
    else:
        mfu.text(0.5, 0.5, "MFU n/a: no peak TFLOP/s known (log.peak_tflops)", transform=mfu.transAxes,
                 ha="center", va="center", color="grey")
    mfu.set(xlabel="devices", ylabel="MFU (%)", title="MFU")
    for ax in (speed, eff, mfu):
        if len(set(devices)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(devices)), [str(d) for d in sorted(set(devices))])
        ax.grid(alpha=0.3)
    model = last_global_record(sweep[0].path).get("model", "")
    return _save(fig, path, f"{mode} scaling of {model}: {sweep[0].path.resolve().parent.name}")


def plot(paths: list[str], out: str | Path | None = None, axis: str = "step") -> list[Path]:
    """Everything ``vitscale-plot`` writes for ``paths`` (run or sweep folders); returns the files."""
    if axis not in X_AXES:
        raise PlotError(f"--x {axis}: choose one of {', '.join(X_AXES)}")
    if not paths:
        raise PlotError("no folders given; pass run folders (run.dir) or a vitscale-sweep --out folder")
    runs, sweeps = find_runs(paths)
    tables = [sweep_rows(sweep) for sweep in sweeps]  # every folder checked before anything is written
    if axis in ("flops", "time"):
        for run in runs:
            run.x(run.of("train")[0], axis)
    out = Path(out) if out is not None else Path(paths[0]) / "plots" if len(paths) == 1 else Path("plots")
    written = plot_runs(runs, out, axis)
    for i, (sweep, (rows, mode)) in enumerate(zip(sweeps, tables)):
        name = "sweep.png" if len(sweeps) == 1 else f"sweep{i + 1}.png"
        written.append(plot_sweep(sweep, out / name, rows, mode))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale-plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (run.dir) or vitscale-sweep --out folders")
    ap.add_argument("--out", help="folder for the PNGs (default RUN_DIR/plots for one folder, else ./plots)")
    ap.add_argument("--x", choices=X_AXES, default="step", help="horizontal axis (default step)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = plot(args.runs, args.out, args.x)
    except PlotError as e:
        logger.error("vitscale-plot: %s", e)
        return 2
    logger.info("wrote %s", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
