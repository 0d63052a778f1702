"""vitscale-plot: the PNGs of two real tiny runs that differ in train.lr (legend labels naming
that key, every x axis), of a sweep folder whose records the throughput meter wrote for 1 and 2
nodes (a straggler marked), resumed steps replaced, and the errors for folders with nothing to plot."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import TINY, read_metrics
from tests.train.test_preview import train_in_one_process
from vitscale.config import dump_config, load_config
from vitscale.data.laion import COUNTERS
from vitscale.data.sources import ImageText
from vitscale.experiment import load_experiment
from vitscale.tools import plot as plot_tool
from vitscale.train.throughput import ThroughputMeter

COMMON = ["data.image_size=32", "model.depth=2", "train.micro_batch=8", "train.global_batch=16", "train.steps=6",
          "log.every=1", "log.warmup_steps=1", "optim.warmup_steps=2", "data.num_workers=0", "checkpoint.at_end=false",
          "data.source=gratings", "data.test=digits", "eval.every=3", "eval.max_samples=32"]
RUN_PNGS = {"loss.png", "lr.png", "grad_norm.png", "eval.png", "throughput.png", "mfu.png", "data_wait.png",
            "overview.png"}


def assert_png(path: Path, min_size=(400, 300), max_size=(2000, 1200)) -> None:
    img = Image.open(path)
    assert img.format == "PNG", path
    assert min_size[0] <= img.width <= max_size[0] and min_size[1] <= img.height <= max_size[1], (path, img.size)
    pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005, f"{path} looks blank"


@pytest.fixture(scope="module")
def lr_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    train_in_one_process(root, TINY, COMMON, {"lr1": ["train.lr=1e-3"], "lr3": ["train.lr=3e-4"]})
    return root / "lr1", root / "lr3"


def test_labels_name_the_keys_that_differ(tmp_path):
    configs = [plot_tool.flatten(yaml.safe_load(dump_config(load_config(TINY, [f"train.lr={lr}", f"run.dir=r/{lr}"]))))
               for lr in ["1e-3", "3e-4"]]
    assert plot_tool.run_labels(configs, ["a", "b"]) == ["train.lr=0.001", "train.lr=0.0003"]
    assert plot_tool.run_labels([configs[0], configs[0]], ["a", "b"]) == ["a", "b"]  # nothing differs: folder names
    assert plot_tool.run_labels([configs[0]], ["only"]) == ["only"]
    many = [dict(configs[0], **{"train.seed": 1, "data.source": "perlin", "model.depth": 2, "optim.eps": 1e-6}),
            configs[1]]
    labels = plot_tool.run_labels(many, ["a", "b"])
    assert labels[0] == "data.source=perlin, model.depth=2, optim.eps=1e-06, +2 more keys"
    assert labels[1] == "data.source=fractal, model.depth=8, optim.eps=1e-08, +2 more keys"


def test_resumed_steps_replace_the_earlier_ones():
    rec = lambda kind, step, loss, **kw: {"kind": kind, "step": step, "loss": loss, **kw}  # noqa: E731
    records = [rec("train", 2, 1.0), rec("train", 4, 0.9), rec("eval", 4, 0.5), rec("train", 6, 0.8),
               rec("train", 4, 0.95), rec("train", 6, 0.85), rec("train", 8, 0.7)]  # resumed from step 3's checkpoint
    kept = plot_tool.latest(records)
    assert [(r["kind"], r["step"], r["loss"]) for r in kept] == [
        ("train", 2, 1.0), ("eval", 4, 0.5), ("train", 4, 0.95), ("train", 6, 0.85), ("train", 8, 0.7)]


def test_plots_of_two_runs(lr_runs, tmp_path):
    out = tmp_path / "plots"
    assert plot_tool.main([*map(str, lr_runs), "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.png")} == RUN_PNGS
    for png in out.glob("*.png"):
        assert_png(png, max_size=(2000, 900))
    runs, sweeps = plot_tool.find_runs([str(r) for r in lr_runs])
    assert [r.label for r in runs] == ["train.lr=0.001", "train.lr=0.0003"] and sweeps == []
    plt = plot_tool._pyplot()
    fig, ax = plt.subplots()
    plot_tool.draw_loss(ax, runs, "step")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train.lr=0.001", "train.lr=0.0003"]
    for line, run_dir in zip(ax.get_lines(), lr_runs):
        train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
        assert list(line.get_xdata()) == [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
        assert list(line.get_ydata()) == [r["loss"] for r in train]
    plt.close(fig)
    assert plot_tool._eval_metrics(runs) == [k for k, v in next(r for r in read_metrics(lr_runs[0])
                                                                if r["kind"] == "eval").items()
                                             if k not in ("kind", "step") and not k.endswith("samples")]


def test_every_x_axis(lr_runs, tmp_path):
    runs, _ = plot_tool.find_runs([str(lr_runs[0])])
    plt = plot_tool._pyplot()
    exp = load_experiment(TINY, COMMON)
    flops = 3 * exp.model.forward_flops(exp.cfg.data.packing.seq_len, exp.cfg.data.packing.max_images)
    got = {}
    for axis in plot_tool.X_AXES:
        fig, ax = plt.subplots()
        plot_tool.draw_loss(ax, runs, axis)
        got[axis] = np.asarray(ax.get_lines()[0].get_xdata(), dtype=float)
        assert ax.get_xlabel() == plot_tool.X_LABELS[axis]
        plt.close(fig)
    steps = np.arange(1, 7)
    assert got["step"].tolist() == steps.tolist()
    assert got["samples"].tolist() == (16 * steps).tolist()
    assert got["flops"] == pytest.approx(16 * steps * flops, rel=1e-9)
    assert (got["time"] >= 0).all() and (np.diff(got["time"][1:]) > 0).all()  # timed from the first timed step
    assert plot_tool.main([str(lr_runs[0]), "--x", "time", "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "loss.png")


def _meter_run(path: Path, hosts_of_rank: list[int], hosts: list[str], slow_node: int | None, batch: int = 64):
    """A run folder whose throughput records the meter builds from per-rank timings (1 step/s per
    rank; a slow node's forward passes take twice as long)."""
    world = len(hosts_of_rank)
    dims = SimpleNamespace(world_size=world, pipe=1, tensor=1, data=world, num_nodes=len(hosts), node=0,
                           node_of_rank=hosts_of_rank, node_hosts=hosts, device=torch.device("cpu"), is_main=True)
    meter = ThroughputMeter(dims, batch, int(35e9), warmup_steps=0, peak_tflops=312.0,
                            info={"model": "vit_base_patch16", "global_batch": batch})
    path.mkdir(parents=True)
    cfg = load_config(TINY, [f"train.global_batch={batch}", f"run.dir={path}"])
    (path / "config.yaml").write_text(dump_config(cfg))
    records = []
    for step in (10, 20, 30):
        meter.steps_done = step
        table = [[step / (1 + 0.1 * world), 0.05 * step, r, 0.3 * step * (2 if hosts_of_rank[r] == slow_node else 1), 0]
                 for r in range(world)]
        records.append({"kind": "train", "step": step, "samples": batch * step, "loss": 3.0 - step / 20, "lr": 1e-3,
                        "grad_norm": 1.5, "skipped": False})
        records += meter.build_records(step, table)
        counts = {k: 0 for k in COUNTERS} | {"read": 100 * step, "kept": 90 * step, "filtered": 6 * step,
                                               "decode_error": 4 * step}
        records.append({"kind": "data", "step": step, **ImageText.summarize(counts)[0]})  # as data_records writes it
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sweep_folder(tmp_path):
    sweep = tmp_path / "sweep"
    _meter_run(sweep / "n1", [0, 0, 0, 0], ["jwb0001"], None)
    _meter_run(sweep / "n2", [0, 0, 0, 0, 1, 1, 1, 1], ["jwb0001", "jwb0002"], slow_node=1)
    (sweep / "scaling.md").write_text("what vitscale-sweep writes beside its runs\n")
    assert plot_tool.main([str(sweep)]) == 0  # default --out: SWEEP_DIR/plots
    out = sweep / "plots"
    assert {p.name for p in out.glob("*.png")} == (RUN_PNGS - {"eval.png"}) | {"sweep.png", "data.png"}
    assert_png(out / "sweep.png", min_size=(1000, 300))
    runs, sweeps = plot_tool.find_runs([str(sweep)])
    assert [r.label for r in runs] == ["sweep/n1", "sweep/n2"] and len(sweeps) == 1  # configs differ in run.dir only
    rows, mode = plot_tool.sweep_rows(sweeps[0])
    assert mode == "strong" and [r["devices"] for r in rows] == [4, 8] and [r["nodes"] for r in rows] == [1, 2]
    # the straggler the meter named is marked on the slow node's curve, at every log step
    assert plot_tool._straggler_steps(runs[1]) == {"jwb0002": {10, 20, 30}}
    plt = plot_tool._pyplot()
    fig, ax = plt.subplots()
    plot_tool.draw_nodes(ax, runs, "step", "pace", threshold=True)
    marks = [line for line in ax.get_lines() if line.get_label() == "straggler"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [10, 20, 30]
    slow = [r for r in read_metrics(sweep / "n2") if r.get("scope") == "node" and r["hostname"] == "jwb0002"]
    assert list(marks[0].get_ydata()) == [r["fwd_samples_per_s"] for r in slow]
    plt.close(fig)
    fig, ax = plt.subplots()
    plot_tool.draw_data(ax, runs[:1], "step")
    shares = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert shares == {"kept": [90.0] * 3, "filtered": [6.0] * 3, "duplicate": [0.0] * 3, "bad": [4.0] * 3}
    plt.close(fig)
    fig, ax = plt.subplots()
    plot_tool.draw_nodes(ax, runs[:1], "step")
    assert not [line for line in ax.get_lines() if line.get_label() == "straggler"]  # none on one node
    plt.close(fig)


def test_weak_sweep(tmp_path):
    _meter_run(tmp_path / "weak" / "p1", [0], ["h"], None, batch=64)
    _meter_run(tmp_path / "weak" / "p2", [0, 0], ["h"], None, batch=128)
    runs, sweeps = plot_tool.find_runs([str(tmp_path / "weak")])
    assert [r.label for r in runs] == ["train.global_batch=64", "train.global_batch=128"]
    rows, mode = plot_tool.sweep_rows(sweeps[0])
    assert mode == "weak" and [r["global_batch"] for r in rows] == [64, 128]
    _meter_run(tmp_path / "mixed" / "p1", [0], ["h"], None, batch=64)
    _meter_run(tmp_path / "mixed" / "p2", [0, 0], ["h"], None, batch=96)
    assert plot_tool.main([str(tmp_path / "mixed")]) == 2  # neither strong nor weak: said, nothing half-written
    assert not (tmp_path / "mixed" / "plots").exists()


def test_folders_with_nothing_to_plot(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert plot_tool.main([str(tmp_path / "empty")]) == 2
    assert (f"vitscale-plot: {tmp_path / 'empty'}: no metrics.jsonl here or in its sub-folders; give run folders "
            "written by vitscale-train (run.dir) or a vitscale-sweep --out folder") in caplog.text
    assert plot_tool.main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in caplog.text
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    assert plot_tool.main([str(tmp_path / "early")]) == 2
    assert "early/metrics.jsonl holds no train record yet" in caplog.text
    assert not list(tmp_path.rglob("*.png"))
