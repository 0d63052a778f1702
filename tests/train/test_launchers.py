"""The same command trains under torchrun, mpirun (MPI discovery), the deepspeed launcher
with a hostfile (launch/deepspeed.sh) and as one plain process, writing per-node and global
records (srun-style environments on two real hosts: tests/tools/test_rehearse_jobs.py); bad configs are refused by the
CLI before any process group starts; the launch scripts pass exit codes on."""
import subprocess
import sys

import pytest

from tests.conftest import BIN, ROOT, TINY, read_metrics, run_training

SHORT = ["train.steps=3", "log.every=1", "model.depth=2", "train.micro_batch=4", "train.global_batch=8",
         "checkpoint.at_end=false", "data.num_workers=0"]


@pytest.mark.distributed
@pytest.mark.parametrize("launcher, nprocs, extra", [
    ("torchrun", 2, []), ("mpirun", 2, ["parallel.interface=lo"]), ("deepspeed-hostfile", 2, []), ("python", 1, [])])
def test_launcher_trains(launcher, nprocs, extra, tmp_path):
    proc = run_training(tmp_path, SHORT + extra, launcher=launcher, nprocs=nprocs)
    rows = read_metrics(tmp_path)
    train = [r for r in rows if r["kind"] == "train"]
    glob = [r for r in rows if r["kind"] == "throughput" and r["scope"] == "global"]
    node = [r for r in rows if r["kind"] == "throughput" and r["scope"] == "node"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert glob[-1]["devices"] == nprocs and glob[-1]["layout"]["data"] == nprocs
    assert [r["step"] for r in node] == [r["step"] for r in glob] == [3]  # one node here
    assert node[-1]["devices"] == nprocs and node[-1]["samples"] == glob[-1]["samples"] == 3 * 8
    assert node[-1]["hostname"] == glob[-1]["slowest_host"] and node[-1]["fwd_samples_per_s"] > 0
    if extra:  # the rendezvous moved to the chosen interface, and the choice is logged
        assert "network interface lo (127.0.0.1) from parallel.interface; master 127.0.0.1:" in proc.stderr + proc.stdout


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


def test_launch_scripts_are_documented_and_pass_exit_codes(tmp_path):
    import os

    scripts = sorted((ROOT / "launch").rglob("*.sh")) + sorted((ROOT / "launch").rglob("*.sbatch"))
    assert {p.name for p in scripts} >= {"deepspeed.sh", "mpirun.sh", "torchrun.sh", "generic.sbatch",
                                         "juwels_booster.sbatch"}
    for script in scripts:
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        assert text.splitlines()[1].startswith("# ") and "exit code" in text, script
        if script.suffix == ".sbatch":
            assert "#SBATCH --signal=USR1@120" in text and "srun " in text and "MASTER_ADDR" in text
        else:  # no config: usage and exit 2
            proc = subprocess.run(["bash", str(script)], capture_output=True, text=True)
            assert proc.returncode == 2 and "CONFIG" in proc.stdout, script
    # a bad key fails in every rank before any process group: mpirun passes the 2 on
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "NP": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "mpirun.sh"), TINY, "train.lrr=1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr + proc.stdout
