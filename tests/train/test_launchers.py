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


@pytest.mark.distributed
def test_srun_style_environment_trains(tmp_path):
    """What srun gives each task: SLURM_* only; the master comes from the node list."""
    import os

    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_STEP_ID="0",
               SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(free_port()))
    cmd = [sys.executable, "-m", "vitscale.train", TINY, f"run.dir={tmp_path}", "log.progress=false", *SHORT]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "via slurm" in outs[0]
    glob = [r for r in read_metrics(tmp_path) if r["kind"] == "throughput" and r["scope"] == "global"]
    assert glob[-1]["devices"] == 2 and glob[-1]["samples"] == 3 * 8


@pytest.mark.distributed
def test_bf16_with_gradient_accumulation_single_process(tmp_path):
    run_training(tmp_path, SHORT + ["train.precision=bf16", "train.micro_batch=2"], launcher="python", nprocs=1)
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    ds = __import__("json").loads((tmp_path / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 4
    assert len(train) == 3 and all(r["grad_norm"] > 0 for r in train)


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("vitscale-train") or str(__import__("pathlib").Path(sys.executable).parent / "vitscale-train")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: vitscale-train" in proc.stdout
