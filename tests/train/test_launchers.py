"""The same command trains under torchrun, mpirun (MPI discovery) and as one plain process;
bad configs are refused by the CLI before any process group starts."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, read_metrics, run_training

SHORT = ["train.steps=3", "log.every=1", "model.depth=2", "train.micro_batch=4", "train.global_batch=8",
         "checkpoint.at_end=false", "data.num_workers=0"]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, nprocs", [("torchrun", 2), ("mpirun", 2), ("python", 1)])
def test_launcher_trains(launcher, nprocs, tmp_path):
    run_training(tmp_path, SHORT, launcher=launcher, nprocs=nprocs)
    rows = read_metrics(tmp_path)
    train = [r for r in rows if r["kind"] == "train"]
    glob = [r for r in rows if r["kind"] == "throughput" and r["scope"] == "global"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert glob[-1]["devices"] == nprocs and glob[-1]["layout"]["data"] == nprocs


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vitscale.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_rejects_a_bad_config_early():
    proc = _cli(TINY, "train.lrr=0.1")
    assert proc.returncode == 2
    assert "unknown config key 'train.lrr'; did you mean 'train.lr'?" in proc.stderr
    assert "Initializing" not in proc.stderr and "init_distributed" not in proc.stderr


def test_cli_checks_the_layout_against_the_launched_world_size():
    env_world = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}  # nothing may connect: validation must fail first
    import os

    proc = subprocess.run([sys.executable, "-m", "vitscale.train", TINY], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env_world})
    assert proc.returncode == 2
    assert "train.global_batch=32 must be a multiple of train.micro_batch x data-parallel ranks = 16 x 3" in proc.stderr


def test_cli_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "key.sub=value" in proc.stdout
