"""vitscale-scaling on handmade run folders (efficiencies computed by hand), and
vitscale-sweep: its plan, its sbatch lines, and one real local run."""
import csv
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, read_metrics
from vitscale.config import ConfigError
from vitscale.tools.scaling import main as scaling_main
from vitscale.tools.sweep import plan, sbatch_lines


def write_run(path, nodes, devices, global_batch, per_device, mfu=None, spread=0.0, model="vit_base_patch16"):
    """A run folder whose metrics.jsonl ends with this global record (earlier records must be ignored)."""
    path.mkdir(parents=True)
    early = {"kind": "throughput", "scope": "global", "samples_per_s": 1.0, "samples_per_s_per_device": 1.0,
             "devices": devices, "nodes": nodes, "global_batch": global_batch, "model": model}
    last = {"kind": "throughput", "scope": "global", "nodes": nodes, "devices": devices, "global_batch": global_batch,
            "samples_per_s": per_device * devices, "samples_per_s_per_device": per_device, "mfu": mfu,
            "node_spread": spread, "slowest_host": f"n{nodes}", "model": model}
    node = {**last, "scope": "node", "samples_per_s": 123.0}
    train = {"kind": "train", "step": 10, "loss": 1.0}
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (early, train, last, node)))
    return path


def test_strong_scaling_table(tmp_path):
    runs = [write_run(tmp_path / "g8", 2, 8, 4096, 1100.0, mfu=0.33, spread=0.05),
            write_run(tmp_path / "g1", 1, 1, 4096, 1342.0, mfu=0.4),
            write_run(tmp_path / "g4", 1, 4, 4096, 1300.0, mfu=0.39, spread=0.0)]
    assert scaling_main([*map(str, runs), "--out", str(tmp_path / "out")]) == 0
    # efficiency = per-device samples/s over the 1-device run's: 1300 / 1342, 1100 / 1342
    md = (tmp_path / "out" / "scaling.md").read_text().splitlines()
    assert md[0] == "Strong scaling of vit_base_patch16 (global batch 4096); efficiency against 1 device(s)."
    assert md[2:] == [
        "| # Nodes | # Devices | global batch | samples/s | samples/s per device | efficiency | MFU | node spread |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| 1 | 1 | 4096 | 1342.0 | 1342.00 | 100.0% | 40.0% | 0.0% |",
        "| 1 | 4 | 4096 | 5200.0 | 1300.00 | 96.9% | 39.0% | 0.0% |",
        "| 2 | 8 | 4096 | 8800.0 | 1100.00 | 82.0% | 33.0% | 5.0% |"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "scaling.csv")))
    assert [int(r["devices"]) for r in rows] == [1, 4, 8]
    assert [float(r["efficiency"]) for r in rows] == pytest.approx([1.0, 1300 / 1342, 1100 / 1342])
    assert [float(r["samples_per_s"]) for r in rows] == [1342.0, 5200.0, 8800.0]
    png = (tmp_path / "out" / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image

    assert Image.open(tmp_path / "out" / "scaling.png").size == (1000, 400)


def test_weak_scaling_and_mode_checks(tmp_path, caplog):
    a = write_run(tmp_path / "a", 1, 2, 64, 50.0)
    b = write_run(tmp_path / "b", 1, 4, 128, 40.0)
    assert scaling_main([str(a), str(b), "--out", str(tmp_path / "o1")]) == 2
    assert "--mode strong keeps the global batch fixed, but the runs differ " in caplog.text
    assert scaling_main([str(a), str(b), "--mode", "weak", "--out", str(tmp_path / "o2")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o2" / "scaling.csv")))
    assert [float(r["efficiency"]) for r in rows] == pytest.approx([1.0, 0.8])
    assert "Weak scaling of vit_base_patch16 (batch 32 per device)" in (tmp_path / "o2" / "scaling.md").read_text()
    c = write_run(tmp_path / "c", 1, 8, 64, 10.0, model="vit_large_patch16")
    assert scaling_main([str(a), str(c), "--out", str(tmp_path / "o3")]) == 2
    assert "the runs train different models (vit_base_patch16, vit_large_patch16)" in caplog.text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    assert scaling_main([str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "o4")]) == 2
    assert "holds no throughput record of scope global; train for more steps" in caplog.text


def test_sweep_plan_and_sbatch_lines(tmp_path):
    runs = plan(TINY, ["train.steps=50"], [1, 2, 4], "weak")
    assert [r[-1] for r in runs.values()] == ["train.global_batch=32", "train.global_batch=64",
                                              "train.global_batch=128"]
    assert all("checkpoint.resume=never" in r for r in runs.values())
    runs = plan(TINY, ["train.micro_batch=4"], [1, 2], "strong", per_count=2)  # 2 and 4 processes
    lines = sbatch_lines("configs/vit_tiny.yaml", runs, tmp_path, "strong", "launch/slurm/generic.sbatch")
    assert lines[0].startswith("sbatch --nodes=1 --job-name=sweep-n1 launch/slurm/generic.sbatch configs/vit_tiny.yaml ")
    assert lines[1].endswith(f"run.dir={tmp_path}/n2")
    assert lines[2] == f"vitscale-scaling {tmp_path}/n1 {tmp_path}/n2 --mode strong --out {tmp_path}"
    with pytest.raises(ConfigError, match=r"train.global_batch=32 must be a multiple of train.micro_batch x "
                                          r"data-parallel ranks = 16 x 3"):
        plan(TINY, [], [1, 3], "strong")  # refused before anything runs


@pytest.mark.distributed
def test_sweep_runs_locally_and_tabulates(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitscale.tools.sweep", TINY, "train.steps=4", "log.every=2",
                           "model.depth=2", "train.micro_batch=4", "train.global_batch=8", "data.num_workers=0",
                           "--procs", "1", "--out", str(tmp_path), "--progress"], cwd=ROOT, capture_output=True,
                          text=True,
                          timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    glob = [r for r in read_metrics(tmp_path / "p1") if r["kind"] == "throughput" and r["scope"] == "global"]
    assert glob[-1]["devices"] == 1 and glob[-1]["step"] == 4
    assert f"| 1 | 1 | 8 | {glob[-1]['samples_per_s']:.1f} |" in proc.stdout
    # its progress bar (--progress: stderr is not a terminal here) counts the steps, on stderr only
    assert "| 4/4 [" in proc.stderr and "sweep" in proc.stderr and "4/4" not in proc.stdout
    assert (tmp_path / "scaling.png").stat().st_size > 0
