"""``benchmarks/mfu.py --tiny``: the vitscale side's figures are those of the run it started."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS, WARMUP = 3, 2


def test_mfu_tiny_reads_its_figures_from_the_runs_metrics(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mfu.py"), "--tiny", "--model", "vit_base_patch16",
                          "--precision", "fp32", "--peak-tflops", "1", "--steps", str(STEPS), "--warmup", str(WARMUP),
                          "--run-dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| vit_base_patch16 |"))
    _, _, _, plain, plain_mfu, ours, our_mfu, ratio = [c.strip() for c in row.strip("|").split("|")]

    records = [json.loads(line) for line in (tmp_path / "vit_base_patch16-eager" / "metrics.jsonl").read_text().splitlines()]
    throughput = [r for r in records if r["kind"] == "throughput" and r["scope"] == "global"]
    train = [r for r in records if r["kind"] == "train"]
    assert len(throughput) == 1 and throughput[0]["measured_steps"] == STEPS
    assert train[-1]["step"] == STEPS + WARMUP and train[-1]["loss"] == train[-1]["loss"]  # the run trained, finite
    rec = throughput[0]
    assert float(ours) == round(rec["samples_per_s"], 2) > 0
    assert our_mfu == f"{100 * rec['mfu']:.2f}%" and 0 < rec["mfu"] < 1
    assert float(plain) > 0 and 0 < float(plain_mfu.rstrip("%")) < 100
    assert float(ratio) == round(float(ours) / float(plain), 3)
