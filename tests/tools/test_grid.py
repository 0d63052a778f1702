"""vitscale-sweep --grid: points, names and early errors; the sbatch array job (its text, bash's syntax
check, and one index run with a stand-in site script); a 2-point grid of 3-step runs that a rerun
skips, and a half-finished point (done marker gone, an earlier checkpoint left) that resumes."""
import csv
import json
import logging
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, TINY, read_metrics
from vitscale.config import ConfigError, load_config
from vitscale.models.spec import resolve_model
from vitscale.tools import grid as grids
from vitscale.tools.sweep import main as sweep_main

TINY_RUN = ["model.depth=1", "data.image_size=32", "train.micro_batch=4", "train.global_batch=4", "train.steps=3",
            "log.every=1", "data.num_workers=0", "log.preview=false", "checkpoint.every=2", "checkpoint.keep=2"]


def test_points_names_and_early_errors():
    grid = grids.parse_grid(["train.lr=3e-4,1e-3", "model.depth=2,4"], seeds=2, base_seed=5)
    points = grids.grid_points(grid)
    assert len(points) == 8 and points[0].name == "lr=3e-4,depth=2,seed=5"
    assert points[-1].overrides == ["train.lr=1e-3", "model.depth=4", "train.seed=6"]
    assert grids.split_values("[0.5,0.5,0.5],[0,0,0]") == ["[0.5,0.5,0.5]", "[0,0,0]"]
    with pytest.raises(ConfigError, match=r"--grid model.dept: unknown config key 'model.dept'; did you mean "
                                          r"'model.depth'\?"):
        grids.check_points(TINY, [], grids.grid_points(grids.parse_grid(["model.dept=2,4"])))
    with pytest.raises(ConfigError, match=r"--grid train.lr: train.lr='fast' must be of type float"):
        grids.check_points(TINY, [], grids.grid_points(grids.parse_grid(["train.lr=1e-3,fast"])))
    with pytest.raises(ConfigError, match=r"grid point name=vit_nope: model.name='vit_nope' is not a registered"):
        grids.check_points(TINY, [], grids.grid_points(grids.parse_grid(["model.name=vit_nope"])))
    with pytest.raises(ConfigError, match="--grid run.dir: not a grid key"):
        grids.parse_grid(["run.dir=a,b"])
    with pytest.raises(ConfigError, match="--seeds and --grid train.seed"):
        grids.parse_grid(["train.seed=1,2"], seeds=2)
    assert sweep_main([TINY, "--grid", "model.dept=2,4", "--out", "/nonexistent/x"]) == 2  # before anything runs


def test_sbatch_array_job(tmp_path, capsys):
    assert sweep_main([TINY, "--grid", "train.lr=3e-4,1e-3", "--grid", "model.depth=2,4", "train.steps=5",
                       "--out", str(tmp_path / "sw"), "--emit-sbatch", "--sbatch-script",
                       str(ROOT / "launch/slurm/generic.sbatch")]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --array=0-3\n" in text and "#SBATCH --gpus-per-node=4\n" in text
    assert "  2) point=lr=1e-3,depth=2; overrides=(train.lr=1e-3 model.depth=2) ;;\n" in text
    script = tmp_path / "grid.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # index 3 with a stand-in site script that records its arguments: point 3's overrides, its own run.dir
    site = tmp_path / "site.sbatch"
    site.write_text('printf "%s\\n" "$@" > "$SITE_ARGS"\n')
    text = text.replace(f"bash {ROOT / 'launch/slurm/generic.sbatch'}", f"bash {site}")
    script.write_text(text)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SITE_ARGS": str(tmp_path / "args")}
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    args = (tmp_path / "args").read_text().splitlines()
    point = tmp_path / "sw" / "lr=1e-3,depth=4"
    assert args[0] == TINY and args[-3:] == ["train.lr=1e-3", "model.depth=4", f"run.dir={point}"]
    assert json.loads((point / "done.json").read_text())["by"] == "sbatch"
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True).stdout.endswith(
        "finished before: skipped\n")


def test_grid_runs_skips_finished_and_resumes_half_finished(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="vitscale")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    out = tmp_path / "sw"
    argv = [TINY, "--grid", "train.lr=1e-3,3e-4", *TINY_RUN, "--out", str(out)]
    assert sweep_main(argv) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["run"] for r in rows] == ["lr=1e-3", "lr=3e-4"] and [r["train.lr"] for r in rows] == ["0.001", "0.0003"]
    spec = resolve_model(load_config(TINY, TINY_RUN).model, 32, 10)
    fwd = spec.forward_flops()
    for row in rows:
        assert int(row["params"]) == spec.parameters and int(row["non_embedding_params"]) == spec.non_embedding_parameters
        assert int(row["nonzero_params"]) == spec.parameters  # dense
        assert int(row["samples"]) == 12 and int(row["flops"]) == 3 * fwd * 12
        train = [r for r in read_metrics(out / row["run"]) if r["kind"] == "train"]
        assert float(row["train_loss"]) == pytest.approx(train[-1]["loss"])
        assert float(row["best_train_loss"]) == pytest.approx(min(r["loss"] for r in train))
        assert row["eval_loss"] == row["top1"] == "" and float(row["wall_s"]) > 0
    # the rerun trains nothing: every point finished
    first = out / "lr=1e-3"
    stamp = (first / "metrics.jsonl").stat().st_mtime_ns
    caplog.clear()
    assert sweep_main(argv) == 0
    assert caplog.text.count("finished before (done.json): skipped") == 2
    assert (first / "metrics.jsonl").stat().st_mtime_ns == stamp
    # half-finished: no done marker, the step-3 checkpoint gone; the rerun resumes from step 2
    (first / "done.json").unlink()
    shutil.rmtree(first / "checkpoints" / "step00000003")
    caplog.clear()
    assert sweep_main(argv) == 0
    assert "lr=1e-3 resumes from its checkpoint" in caplog.text
    assert "resumed from" in (first / "train.log").read_text() and "at step 2" in (first / "train.log").read_text()
    steps = [r["step"] for r in read_metrics(first) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 3]  # step 3 trained again after the resume
    assert (first / "done.json").is_file() and len(json.loads((first / "sweep_attempts.json").read_text())) == 2


def test_sweep_table_takes_a_sparse_runs_nonzero_parameters_from_its_log(tmp_path):
    """``nonzero_params`` (the column ``vitscale-fit --x nonzero_params`` reads) is what a model.sparsity
    run logged last, not the dense count."""
    from vitscale.config.loading import dump_config

    run = tmp_path / "sparse"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(TINY, ["model.sparsity.pattern=2:4"])))
    records = [{"kind": "train", "step": s, "samples": 32 * s, "loss": 2.0, "nonzero_params": n}
               for s, n in ((1, 5_000_000), (2, 3_000_000))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = grids.point_row(run, grids.Point("sparse", ["model.sparsity.pattern=2:4"]), ["model.sparsity.pattern"])
    assert row["nonzero_params"] == 3_000_000 and row["params"] > 3_000_000
    assert row["model.sparsity.pattern"] == "2:4"
