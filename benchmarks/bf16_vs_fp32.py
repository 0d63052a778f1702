"""How far bf16 training moves the losses from fp32: the reference the bf16 layout tests take
their tolerance from (tests/train/test_precision.py).

    python benchmarks/bf16_vs_fp32.py [--seeds 0 1 2 3] [key=value ...]

For each seed, one process trains configs/vit_tiny.yaml with the settings of the layout tests
(4 steps, 4 blocks, 4 micro-batches of 4, gradient clipping active, ZeRO-1) twice, in fp32 and in
bf16 (fp32 gradient accumulation and reduction, vitscale.config.deepspeed), and the relative
difference |bf16 - fp32| / |fp32| of each step's loss is printed, with the largest over all.
Extra ``key=value`` overrides apply to both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The settings of tests/train/test_precision.py (its COMMON, ZeRO-1 on one process).
TEST = ["train.steps=4", "log.every=1", "log.progress=false", "model.depth=4", "train.micro_batch=4",
        "train.global_batch=16", "optim.warmup_steps=2", "optim.grad_clip=1.0", "checkpoint.at_end=false",
        "data.num_workers=0", "parallel.zero=1"]


def losses(run_dir: Path, precision: str, seed: int, extra: list[str]) -> list[float]:
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "vitscale.train", str(ROOT / "configs" / "vit_tiny.yaml"), f"run.dir={run_dir}",
           f"train.precision={precision}", f"train.seed={seed}", *TEST, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="vitscale-bf16-") as tmp:
        for seed in args.seeds:
            ref = losses(Path(tmp) / f"fp32_{seed}", "fp32", seed, args.overrides)
            got = losses(Path(tmp) / f"bf16_{seed}", "bf16", seed, args.overrides)
            rel = [abs(b - f) / abs(f) for f, b in zip(ref, got)]
            worst = max(worst, *rel)
            print(f"seed {seed}: fp32 {[round(x, 6) for x in ref]}")
            print(f"seed {seed}: bf16 {[round(x, 6) for x in got]}  relative difference "
                  f"{[f'{x:.2e}' for x in rel]}")
    print(f"largest relative difference bf16 vs fp32 over {len(args.seeds)} seed(s) x {len(ref)} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
