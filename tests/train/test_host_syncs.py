"""The training loop reads no value of the step it is taking back to the host except at log
steps (issue 21): on a GPU each such read waits for the device's queue to drain."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One probe run: (what it recorded, its stderr)."""
    tmp = tmp_path_factory.mktemp("syncs")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MASTER_PORT": str(free_port())}
    out = tmp / "reads.json"
    proc = subprocess.run([sys.executable, "-m", "tests.train.host_sync_probe", str(out), str(tmp / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


def test_no_host_reads_of_a_steps_values_outside_log_steps(probe):
    seen = probe[0]
    log_steps = {s for s in range(1, seen["steps"] + 1) if s % seen["log_every"] == 0}
    by_step = {}
    for step, where, what in seen["reads"]:
        by_step.setdefault(step, []).append(f"{where} {what}")
    # outside log steps nothing of vitscale's reads a tensor's value ...
    assert set(by_step) <= log_steps, {s: r for s, r in by_step.items() if s not in log_steps}
    assert all(by_step.get(s) for s in log_steps), by_step  # ... while the counter sees the log steps' reads
    # the per-step agreement of step N is read during step N + 1, or at once at a log step, never twice
    polls = {polled: step for step, polled in seen["polls"]}
    assert len(polls) == len(seen["polls"]) and sorted(polls) == list(range(1, seen["steps"] + 1)), seen["polls"]
    assert all(polls[s] == (s if s in log_steps else s + 1) for s in polls), seen["polls"]


def test_the_start_logs_the_speed_choices_in_force(probe):
    """One line, read from what was built: the probe's fp32 ZeRO-1 run on the CPU with DeepSpeed's Adam."""
    line = next(line for line in probe[1].splitlines() if "speed: " in line)
    for part in ["attention SDPA (CPU", "optimizer FusedAdam in DeepSpeedZeroOptimizer", "fp32 weights, fp32 master",
                 "torch.compile off", "channels_last off (train.channels_last=auto)", "pinned host memory off (cpu)",
                 "ZeRO-1 (reduce_bucket_size 50000000, allgather_bucket_size 50000000; preset auto)"]:
        assert part in line, (part, line)
