import json
import os
import socket
import subprocess
import sys
import tempfile
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
    if launcher == "deepspeed-hostfile":  # launch/deepspeed.sh with a hostfile naming only this machine
        hostfile = Path(tempfile.mkdtemp()) / "hostfile"
        hostfile.write_text(f"localhost slots={nprocs}\n")
        return ["env", f"PATH={BIN}:{os.environ['PATH']}", f"HOSTFILE={hostfile}", "MASTER_ADDR=127.0.0.1",
                f"MASTER_PORT={port}", "DS_ARGS=--no_ssh_check", "bash", str(ROOT / "launch" / "deepspeed.sh"), *args]
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


def _gloo_worker(rank: int, world: int, check, init_file: str, errors) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        check(rank, world)
        dist.destroy_process_group()
    except BaseException:  # report to the parent: a failing spawn otherwise shows little
        import traceback

        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    # The check passed: leave without the interpreter's teardown, where gloo's transport threads
    # can still be running and abort the process ("terminate called without an active
    # exception", seen in CI after a passing check), turning a pass into a failed exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_gloo(check, world: int) -> None:
    """Run ``check(rank, world)`` in ``world`` spawned processes joined in a gloo group;
    fail with every rank's traceback if any raises. ``check`` must be a module-level function."""
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        procs = [ctx.Process(target=_gloo_worker, args=(r, world, check, init_file, errors)) for r in range(world)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=300)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, "\n".join(messages)
    assert all(proc.exitcode == 0 for proc in procs)


def launch_layouts(root: Path, nprocs: int, layouts: dict, common: list[str], config: str = TINY,
                   env: dict | None = None) -> None:
    """Train ``config`` in several layouts in one deepspeed launch (tests/train/layouts.py):
    ``layouts`` is {name: overrides} (or {name: {"overrides": [...], "call": "module:function"}}
    for a probe that trains the run); each run goes to ``root/name``; one process runs under plain
    python, like ``python -m vitscale.train``. ``env``: extra variables
    (e.g. a fault-injection hook) for every layout."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    env.pop("RANK", None)
    script = [str(ROOT / "tests" / "train" / "layouts.py"), config, str(root), json.dumps(common), json.dumps(layouts)]
    if nprocs == 1:  # one process needs no launcher (as ``python -m vitscale.train``), and starts faster
        cmd = [sys.executable, *script]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()), *script]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{nprocs}-process layouts failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny tensors: as fast as many, and it stays fast when the
    CPU is shared (OpenMP workers spin-wait for busy cores; 3x slower under load here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
