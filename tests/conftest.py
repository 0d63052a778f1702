import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "vit_tiny.yaml")
BIN = Path(sys.executable).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: starts several processes (gloo on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launcher: str, nprocs: int, args: list[str]) -> list[str]:
    """The command line a user types for each launcher."""
    port = str(free_port())
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port,
                "--module", "vitscale.train", *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", port,
                "-m", "vitscale.train", *args]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "-np", str(nprocs), "-env", "MASTER_PORT", port,
                sys.executable, "-m", "vitscale.train", *args]
    if launcher == "python":
        return [sys.executable, "-m", "vitscale.train", *args]
    raise ValueError(launcher)


def run_training(run_dir: Path, overrides: list[str], launcher: str = "deepspeed", nprocs: int = 2,
                 config: str = TINY, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    cmd = launch_command(launcher, nprocs, [config, f"run.dir={run_dir}", "log.progress=false", *overrides])
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture
def tiny_config():
    return TINY
