"""Kill / resume drill: kill -9 one rank of a running job, measure how fast the job ends,
resume it, and check what the resumed run trained on.

    python benchmarks/fault_drill.py [--runs 3] [--world 2] [--heartbeat 10] [key=value ...]

Each run starts ``--world`` ranks of ``vitscale.train`` as separate processes (as ``srun``
does: no launcher ends the job for us, vitscale's heartbeat has to), waits for a
step, kills one rank (alternating which), times until every survivor has exited, then
resubmits with ``checkpoint.resume=auto`` until a few steps past the kill. Printed per run
and in total: time to detect (kill -> last rank gone), the exit codes, steps lost (done
before the kill but after the last complete checkpoint, so trained again), and samples
lost / repeated: a step of the resumed run whose loss differs from the first run's at the
same step means the data or state there differs (on-the-fly data: a pure function of the
step, so equal losses mean the same samples); a step missing from the resumed run is lost.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model.depth=2", "data.source=gratings", "data.image_size=32", "train.micro_batch=4", "train.global_batch=16",
        "log.every=1", "log.progress=false", "checkpoint.at_end=false", "checkpoint.every=3", "data.num_workers=1",
        "train.steps=100000", "parallel.timeout_s=60"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start(run_dir: Path, overrides: list[str], world: int) -> list[subprocess.Popen]:
    port, procs = _port(), []
    for rank in range(world):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        log = open(run_dir / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "vitscale.train", "configs/vit_tiny.yaml",
                                       f"run.dir={run_dir}", *overrides], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def wait_steps(run_dir: Path, after: int, count: int, procs: list, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(losses(run_dir)) < after + count:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the run in {run_dir} did not reach {count} steps; see its rank*.log")
        time.sleep(0.2)


def drill(run_dir: Path, overrides: list[str], world: int, victim: int, kill_after: int) -> dict:
    from vitscale.train.checkpoint import find_resume, read_marker

    procs = start(run_dir, overrides, world)
    wait_steps(run_dir, 0, kill_after, procs)
    os.killpg(procs[victim].pid, signal.SIGKILL)
    t0 = time.time()
    codes = [p.wait(timeout=600) for p in procs]
    detect_s = time.time() - t0
    first = dict(losses(run_dir))
    done = read_marker(find_resume(run_dir, "auto"))["step"]
    before = len(losses(run_dir))
    procs = start(run_dir, overrides, world)
    wait_steps(run_dir, before, max(first) - done + 2, procs)
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    resumed = dict(losses(run_dir)[before:])
    redone = [s for s in range(done + 1, max(first) + 1)]
    return {"victim": victim, "exit_codes": codes, "detect_s": detect_s, "checkpoint": done, "last_step": max(first),
            "steps_lost": len(redone), "first_resumed": min(resumed),
            "samples_lost": sum(s not in resumed for s in redone) + (min(resumed) - done - 1),
            "samples_repeated_or_differing": sum(resumed[s] != first[s] for s in redone if s in resumed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--heartbeat", type=float, default=10.0, help="parallel.heartbeat_s")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = BASE + [f"parallel.heartbeat_s={args.heartbeat}"] + args.overrides
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            run_dir = Path(tmp) / f"run{i}"
            run_dir.mkdir()
            r = drill(run_dir, overrides, args.world, victim=i % args.world, kill_after=4 + i)
            results.append(r)
            print(f"run {i}: kill -9 rank {r['victim']} after step {r['last_step']}: job ended in "
                  f"{r['detect_s']:.1f} s (exit codes {r['exit_codes']}); resumed at step {r['first_resumed']} from "
                  f"checkpoint {r['checkpoint']}; steps lost {r['steps_lost']}; samples lost {r['samples_lost']}, "
                  f"repeated or differing {r['samples_repeated_or_differing']}", flush=True)
    detect = sorted(r["detect_s"] for r in results)
    print(f"runs {len(results)}, faults injected {len(results)}, heartbeat {args.heartbeat:g} s, world {args.world}: "
          f"time to detect median {detect[len(detect) // 2]:.1f} s, max {detect[-1]:.1f} s; steps lost "
          f"{sum(r['steps_lost'] for r in results)} (checkpoint.every=3); samples lost beyond the last checkpoint "
          f"{sum(r['samples_lost'] for r in results)}, repeated {sum(r['samples_repeated_or_differing'] for r in results)}")


if __name__ == "__main__":
    main()
