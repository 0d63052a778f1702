"""Issue 20: multi-node paths for real, on network namespaces as hosts (``vitscale-rehearse``).

Few launches cover many cases: one slowed torchrun run is the reference (per-node records,
ib0, stragglers, losses); three fault runs go side by side (each rehearsal has namespaces of
its own); the node-1-link run is resumed under the deepspeed launcher and must give the
reference's losses; mpirun and an srun-style CLIP pipe 2 run (one stage per node) once each.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY, read_metrics

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")]

CLIP = str(ROOT / "configs" / "clip_tiny.yaml")
STEPS, FAIL_AT, HEARTBEAT = 12, 6, 20
COMMON = ["log.every=1", "log.progress=false", "log.preview=false", "parallel.interface=ib0"]


def _cmd(run_dir, flags, overrides=(), config=TINY):
    return [sys.executable, "-m", "vitscale.tools.rehearse", "--nodes", "2", "--per-node", "1", *flags, config,
            f"run.dir={run_dir}", *COMMON, *overrides]


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def rehearse(run_dir, flags, overrides=(), config=TINY) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, flags, overrides, config), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def _nodes_and_interfaces(proc, run_dir, n_steps):
    """Per-node records name node0 and node1 and add up to the global figure; each node logs ib0
    with its own namespace address."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    recs = [r for r in read_metrics(run_dir) if r["kind"] == "throughput"]
    glob = {r["step"]: r for r in recs if r["scope"] == "global"}
    nodes = [r for r in recs if r["scope"] == "node"]
    assert {r["hostname"] for r in nodes} == {"node0", "node1"}
    assert glob and max(glob) == n_steps
    for step, g in glob.items():
        mine = [r for r in nodes if r["step"] == step]
        assert len(mine) == 2
        # over one window (the job's): the samples and the rates add up
        assert sum(r["measured_samples"] for r in mine) == g["measured_samples"]
        assert sum(r["samples_per_s"] for r in mine) == pytest.approx(g["samples_per_s"], rel=1e-9)
    for i in (0, 1):
        # (under mpirun and the deepspeed launcher every rank's output reaches us through node0's launcher)
        assert re.search(rf"node {i} \(node{i}\): network interface ib0 \(198\.18\.0\.{i + 1}\)",
                         proc.stdout), f"node{i} did not log ib0 with its address"
    assert "removed 3 namespaces" in proc.stderr
    return glob


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """torchrun, node1 at a third of the speed: the uninterrupted run the resumed one is held to."""
    run_dir = tmp_path_factory.mktemp("rehearse") / "slow"
    proc = rehearse(run_dir, ["--launcher", "torchrun", "--slow-node", "1:3"], [f"train.steps={STEPS}"])
    return run_dir, proc


def test_torchrun_names_nodes_picks_ib0_and_finds_the_slow_node(reference):
    run_dir, proc = reference
    glob = _nodes_and_interfaces(proc, run_dir, STEPS)
    last = glob[max(glob)]
    assert last["slowest_host"] == "node1" and "node1" in last["stragglers"]
    assert re.search(r"straggler: node 1 \(node1\)", proc.stdout)
    assert "node1 slowed 3x" in proc.stdout  # the summary says what was done


def test_mpirun_across_the_namespaces(tmp_path):
    proc = rehearse(tmp_path, ["--launcher", "mpirun"], ["train.steps=4", "checkpoint.at_end=false"])
    _nodes_and_interfaces(proc, tmp_path, 4)


def test_clip_pipe_2_with_one_stage_per_node_srun_style(tmp_path):
    """srun-style tasks (SLURM_* as the sbatch scripts see them); stage 0 on node0, stage 1 on
    node1: each node's record carries its own stage's FLOPs."""
    proc = rehearse(tmp_path, ["--launcher", "srun-style"], ["train.steps=4", "parallel.pipe=2",
                                                              "checkpoint.at_end=false", "log.tensorboard=true"],
                    config=CLIP)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    recs = [r for r in read_metrics(tmp_path) if r["kind"] == "throughput" and r["step"] == 4]
    node = {r["hostname"]: r for r in recs if r["scope"] == "node"}
    glob = next(r for r in recs if r["scope"] == "global")
    assert set(node) == {"node0", "node1"}
    # one pipeline: both stages see the same samples; the node TFLOPs add up to the global work
    assert node["node0"]["measured_samples"] + node["node1"]["measured_samples"] == glob["measured_samples"]
    assert node["node0"]["tflops_per_device"] + node["node1"]["tflops_per_device"] == \
        pytest.approx(glob["tflops_per_device"] * 2, rel=1e-9)
    assert node["node0"]["tflops_per_device"] != pytest.approx(node["node1"]["tflops_per_device"], rel=1e-3)
    assert "started 2 processes on 2 node(s) via slurm" in proc.stdout
    assert all(r["loss"] == r["loss"] for r in read_metrics(tmp_path) if r["kind"] == "train")
    # log.tensorboard: each node's figures as scalars tagged by its host, equal to the records
    from tests.train.test_monitors import assert_each_step_once, expected_scalars, tensorboard_scalars

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert {f"throughput/node/{h}/samples_per_s" for h in ("node0", "node1")} <= scalars.keys()
    assert_each_step_once(scalars, expected_scalars(read_metrics(tmp_path)))


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Three rehearsals side by side: node1's link, node0's link (the store's host), node1 frozen,
    each at step FAIL_AT, with checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("faults")
    runs = {}
    # (a frozen node never ends: once the survivor has, the rehearsal need not wait its default grace)
    for name, spec, grace in (("link1", "1:%d:link", []), ("link0", "0:%d:link", []),
                              ("freeze1", "1:%d:freeze", ["--grace", "5"])):
        runs[name] = subprocess.Popen(
            _cmd(root / name, ["--launcher", "torchrun", "--fail-node", spec % FAIL_AT, *grace],
                 [f"train.steps={STEPS}", f"parallel.heartbeat_s={HEARTBEAT}", "checkpoint.every=2"]),
            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)  # stagger the starts a little on 2 cores
    return root, {name: (p, *p.communicate(timeout=900)) for name, p in runs.items()}


@pytest.mark.parametrize("name,lost,survivor", [("link1", "node1", "node0"), ("link0", "node0", "node1"),
                                                ("freeze1", "node1", "node0")])
def test_a_lost_node_ends_the_job_in_a_heartbeat_naming_its_host(faults, name, lost, survivor):
    root, runs = faults
    proc, out, err = runs[name]
    assert proc.returncode != 0, out[-3000:]
    # the surviving node's launcher ends by itself, within heartbeat_s plus a beat (+ its exit)
    m = re.search(rf"  {survivor} \(\S+\) torchrun: exit (\d+) at \S+ s, ([0-9.]+) s after the fault", out)
    assert m, out[-3000:]
    assert int(m.group(1)) != 0 and float(m.group(2)) <= HEARTBEAT + HEARTBEAT / 6 + 8, m.group(0)
    # ... naming the lost node's host
    assert re.search(rf"\[{survivor}\].*lost .*host {lost}", out), out[-3000:]
    assert "--fail-node" not in err and "removed 3 namespaces" in err


def test_the_link_fault_run_resumes_to_the_uninterrupted_losses(faults, reference):
    """Resumed with checkpoint.resume=auto from the last complete checkpoint, under the
    deepspeed launcher this time: the losses after the resume are the reference's, bit for bit."""
    root, _ = faults
    ref_dir, _ = reference
    proc = rehearse(root / "link1", ["--launcher", "deepspeed"], [f"train.steps={STEPS}", "checkpoint.resume=auto"])
    _nodes_and_interfaces(proc, root / "link1", STEPS)
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", proc.stdout).group(1))
    assert 0 < resumed_from <= FAIL_AT
    straight, resumed = _losses(ref_dir), _losses(root / "link1")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in range(resumed_from + 1, STEPS + 1)] == \
        [straight[s] for s in range(resumed_from + 1, STEPS + 1)]
