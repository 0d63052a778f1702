"""The planner (``vitscale.planner``) checked against what this machine measures (issue 23).

1. Calibrate the CPU as a device kind, from micro-benchmarks only (two processes at once, as the
   runs have two ranks, so both share the cores as the runs do):
   - the achieved FLOP/s of one transformer block's forward + backward at each model's block
     shapes (tokens, width, heads, micro-batch), FLOPs from ``models/flops.py``;
   - the rest of a plain PyTorch forward + backward of the whole model (embedding, head, loss:
     what the block rate does not cover) as a per-micro-batch overhead;
   - gloo all-reduce between the two processes at 4 KB - 4 MB: latency and bandwidth by a
     least-squares fit of t = 2 lat + S / bw (a ring of two);
   - AdamW's parameters per second on a flat buffer of the model's size;
   - the resident size of a process that has imported the training stack and joined a gloo
     group: the framework allowance.
2. Run the tiny ViT and the tiny CLIP (``configs/vit_tiny.yaml``, ``configs/clip_tiny.yaml``) in
   data 2, tensor 2, pipe 2 and ZeRO-3 with the deepspeed launcher (2 processes), reading the
   median step time after warm-up from ``metrics.jsonl`` (``step_time_s_p50``) and each rank's
   peak resident size (``VmHWM``).
3. Print predicted vs measured side by side with the ratios; the last line holds the tiny ViT's
   predicted / measured step time and peak memory ratios of the four layouts.

    python benchmarks/plan_check.py                      # about 6 minutes on 2 cores
    python benchmarks/plan_check.py --models vit --steps 40
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: two ranks on two cores

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"vit": "configs/vit_tiny.yaml", "clip": "configs/clip_tiny.yaml"}
# (name, pipe, tensor, zero): the layouts of the issue
LAYOUTS = [("data2", 1, 1, 1), ("tensor2", 1, 2, 1), ("pipe2", 2, 1, 1), ("zero3", 1, 1, 3)]
FIXED = ["checkpoint.at_end=false", "checkpoint.resume=never", "log.progress=false", "log.preview=false"]
# The framework's own cost: the same config, layout, data and block count with 16-wide blocks, whose
# FLOPs and bytes are a few hundredths of the tiny models' (the modules, hooks and messages stay).
HOLLOW = {"vit": ["model.embed_dim=16"],
          "clip": ["model.vision={layers: 2, width: 16, head_width: 4}",
                   "model.text={layers: 2, width: 16, heads: 4}", "model.embed_dim=16"]}


# --------------------------------------------------------------------------- calibration


def _blocks(model):
    """One block module of each transformer stack of ``model``, with its token count."""
    from vitscale.models.vit import Block, ParallelBlock

    cfg = model.cfg
    found = []
    if hasattr(cfg, "vision"):  # a CLIP: image tower then text tower
        stacks = [(model.visual, cfg.vision.vit.seq_len), (model.text, cfg.text.context_length)]
    else:
        stacks = [(model, cfg.seq_len)]
    for tower, tokens in stacks:
        block = next(m for m in tower.modules() if isinstance(m, (Block, ParallelBlock)))
        found.append((block, tokens))
    return found


def _block_flops(block, tokens: int) -> int:
    """Forward FLOPs of one block on one sample, counted by torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    width = next(p for n, p in block.named_parameters() if p.dim() == 2).shape[1]
    with FlopCounterMode(display=False) as counter:
        block(torch.zeros(1, tokens, width))
    return counter.get_total_flops()


def _time(fn, repeats: int = 15, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` (fixed counts: a collective
    must be called as often on every rank)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _calibrate_rank(rank: int, port: int, configs: dict, queue) -> None:
    """One of the two calibration processes (see the module docstring)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import resource

    import torch
    import torch.distributed as dist

    import deepspeed  # noqa: F401  the training stack, for the framework allowance
    import vitscale.train.loop  # noqa: F401
    import vitscale.train.setup  # noqa: F401
    from vitscale.experiment import load_experiment

    dist.init_process_group("gloo", rank=rank, world_size=2)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    torch.manual_seed(rank)
    out = {"framework_gb": rss_gb, "models": {}}
    for key, config in configs.items():
        exp = load_experiment(config)
        model = exp.model.create().train()
        mb = exp.cfg.train.micro_batch
        rates, block_s = [], 0.0
        for block, tokens in _blocks(model):
            x = torch.randn(mb, tokens, block.norm1.normalized_shape[0] if hasattr(block, "norm1")
                            else block.in_norm.normalized_shape[0], requires_grad=True)
            flops = 3 * _block_flops(block, tokens) * mb

            def step():
                block(x).sum().backward()

            dist.barrier()
            seconds = _time(step)
            rates.append((flops, seconds))
        flops_blocks = sum(f for f, _ in rates)
        rate = flops_blocks / sum(s for _, s in rates)  # FLOP-weighted over the stacks
        # the whole model, plain PyTorch: what is not a block (embedding, head, loss) is overhead
        from vitscale.models.flops import forward_flops
        if exp.model.kind == "clip":
            v, t = exp.model.arch.vision, exp.model.arch.text
            inputs = (torch.randn(mb, 3, v.image_size, v.image_size), torch.randint(1, t.vocab_size,
                                                                                   (mb, t.context_length)))
            loss = lambda out: out[0].float().sum() + out[1].float().sum()  # noqa: E731
        else:
            size = exp.cfg.data.image_size
            inputs = (torch.randn(mb, 3, size, size),)
            loss = lambda out: torch.nn.functional.cross_entropy(out, torch.zeros(mb, dtype=torch.long))  # noqa: E731

        def whole():
            loss(model(*inputs)).backward()

        dist.barrier()
        whole_s = _time(whole)
        overhead_s = max(0.0, whole_s - 3 * forward_flops(model) * mb / rate)
        params = sum(p.numel() for p in model.parameters())
        flat = torch.nn.Parameter(torch.zeros(params))
        flat.grad = torch.randn(params)
        adam = torch.optim.AdamW([flat], lr=1e-3)
        dist.barrier()
        adam_s = _time(adam.step)
        out["models"][key] = {"block_flops_per_s": rate, "overhead_s": overhead_s, "whole_s": whole_s,
                              "adam_params_per_s": params / adam_s}
    sizes, times = [2**k for k in range(10, 21, 2)], []  # 1 Ki - 1 Mi fp32 elements: 4 KB - 4 MB
    for n in sizes:
        buf = torch.ones(n)
        dist.barrier()
        times.append(_time(lambda: dist.all_reduce(buf), repeats=20))
    # t = 2 lat + S / bw for a ring of two (all-reduce moves 2 (n-1)/n = 1 x the buffer)
    xs, ys = [4 * n for n in sizes], times
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    out["allreduce_bw_gbs"] = 1 / max(slope, 1e-12) / 1e9
    out["latency_us"] = max(1.0, (my - slope * mx) / 2 * 1e6)
    queue.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def calibrate(configs: dict) -> dict:
    """The CPU's constants, from two calibration processes (rank 0's figures, block rates averaged)."""
    import torch.multiprocessing as mp

    from vitscale.distributed import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_calibrate_rank, args=(r, port, configs, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    out = results[0]
    for key in out["models"]:
        for field in ("block_flops_per_s", "overhead_s", "adam_params_per_s"):
            out["models"][key][field] = statistics.fmean(r["models"][key][field] for r in results.values())
    out["framework_gb"] = max(r["framework_gb"] for r in results.values())
    return out


def cpu_kind(cal: dict, model: str, overhead_s: float = 0.0, framework_gb: float | None = None):
    """The CPU as a planner device kind with the measured constants of ``model``'s shapes; the
    framework's per-micro-batch time and resident size from the hollow run where given."""
    from vitscale.planner import DeviceKind

    m = cal["models"][model]
    return DeviceKind("cpu", peak_tflops=m["block_flops_per_s"] / 1e12, efficiency=1.0, mem_gb=1e6,
                      mem_bw_gbs=1.0, intra_bw_gbs=cal["allreduce_bw_gbs"], inter_bw_gbs=cal["allreduce_bw_gbs"],
                      latency_us=cal["latency_us"],
                      framework_gb=cal["framework_gb"] if framework_gb is None else framework_gb,
                      fused_attention=True,  # torch's CPU SDPA is a fused kernel: no scores kept
                      overhead_s=m["overhead_s"] + overhead_s, optimizer_params_per_s=m["adam_params_per_s"])


def framework(cal: dict, model: str, config: str, layout: tuple, overrides: list[str], run_dir: Path) -> tuple:
    """The framework's per-micro-batch time and resident size in this layout: a run of the hollow
    model (``HOLLOW``) less what the planner predicts for the hollow model itself."""
    from vitscale.experiment import load_experiment
    from vitscale.planner import Machine, model_shape, plan_layout

    _, pipe, tensor, zero = layout
    exp = load_experiment(config, HOLLOW[model])
    measured = run(config, overrides + HOLLOW[model], run_dir)
    bare = plan_layout(exp, Machine(2, 2, cpu_kind(cal, model, framework_gb=0.0), 1e6), model_shape(exp), pipe,
                       tensor, zero, "none", False, exp.cfg.train.micro_batch)
    slots = bare.grad_accum + pipe - 1  # micro-batch slots of a step (1F1B: m + p - 1)
    return max(0.0, measured["step_s"] - bare.step_s) / slots, max(0.0, measured["rss_gb"] - bare.memory_gb), measured


# --------------------------------------------------------------------------- runs


def _descendants(pid: int) -> dict[int, int]:
    """{pid: parent pid} of every process under ``pid``."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in found:
                found[child] = p
                frontier.append(child)
    return found


def _hwm_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


def run(config: str, overrides: list[str], run_dir: Path) -> dict:
    """Train with the deepspeed launcher on 2 processes; the median step time after warm-up and the
    largest peak resident size of a rank (its loader workers and the launchers left out)."""
    from vitscale.distributed import free_port

    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "vitscale.train",
           config, *overrides, *FIXED, f"run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    peaks: dict[int, float] = {}
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            tree = _descendants(proc.pid)
            for pid, par in tree.items():
                # a rank: a process started by the per-node launcher (launch.py), not one of its forks
                try:
                    parent_cmd = Path(f"/proc/{par}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"deepspeed.launcher.launch" in parent_cmd and (hwm := _hwm_gb(pid)) is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), hwm)
            time.sleep(0.25)
    if proc.returncode != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-12:])
        raise RuntimeError(f"{config} {' '.join(overrides)} failed (exit {proc.returncode}):\n{tail}")
    from vitscale.train.throughput import read_metrics

    glob = [r for r in read_metrics(run_dir) if r.get("kind") == "throughput" and r.get("scope") == "global"]
    return {"step_s": glob[-1]["step_time_s_p50"], "rss_gb": max(peaks.values()) if peaks else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,clip", help="vit, clip or both (default vit,clip)")
    ap.add_argument("--steps", type=int, default=30, help="steps per run (default 30; the first 5 are warm-up)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(CONFIGS):
        ap.error(f"--models must name vit and / or clip, got {args.models}")
    if args.steps < 10:
        ap.error("--steps must be >= 10 (5 warm-up steps, then at least one log interval)")
    os.chdir(ROOT)

    from vitscale.experiment import load_experiment
    from vitscale.planner import Machine, model_shape, plan_layout

    t0 = time.time()
    cal = calibrate({m: CONFIGS[m] for m in models})
    print(f"calibration ({time.time() - t0:.0f} s): gloo all-reduce {cal['allreduce_bw_gbs']:.2f} GB/s, latency "
          f"{cal['latency_us']:.0f} us; framework {cal['framework_gb']:.3f} GB resident", flush=True)
    for m in models:
        c = cal["models"][m]
        print(f"  {m}: block {c['block_flops_per_s'] / 1e9:.2f} GFLOP/s, rest of the model {1e3 * c['overhead_s']:.1f} "
              f"ms per micro-batch, AdamW {c['adam_params_per_s'] / 1e6:.0f} M params/s", flush=True)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="plan_check."))
    rows = []
    print("| model | layout | hollow step s | hollow RSS GB | predicted step s | measured step s | ratio | "
          "predicted RSS GB | measured RSS GB | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for m in models:
        exp = load_experiment(CONFIGS[m])
        shape = model_shape(exp)
        for layout in LAYOUTS:
            name, pipe, tensor, zero = layout
            overrides = [f"parallel.pipe={pipe}", f"parallel.tensor={tensor}", f"parallel.zero={zero}",
                         f"train.steps={args.steps}", "log.every=5", "log.warmup_steps=5"]
            overhead_s, framework_gb, hollow = framework(cal, m, CONFIGS[m], layout, overrides,
                                                         out / f"{m}_{name}_hollow")
            machine = Machine(2, 2, cpu_kind(cal, m, overhead_s, framework_gb), 1e6)
            predicted = plan_layout(exp, machine, shape, pipe, tensor, zero, "none", False, exp.cfg.train.micro_batch)
            measured = run(CONFIGS[m], overrides, out / f"{m}_{name}")
            row = {"model": m, "layout": name, "predicted_step_s": predicted.step_s, "measured_step_s": measured["step_s"],
                   "step_ratio": predicted.step_s / measured["step_s"], "predicted_gb": predicted.memory_gb,
                   "measured_gb": measured["rss_gb"], "memory_ratio": predicted.memory_gb / measured["rss_gb"],
                   "predicted": predicted.row(), "hollow": hollow, "framework_s_per_micro_batch": overhead_s,
                   "framework_gb": framework_gb}
            rows.append(row)
            print(f"| {m} | {name} | {hollow['step_s']:.4f} | {hollow['rss_gb']:.3f} | {row['predicted_step_s']:.4f} | {row['measured_step_s']:.4f} | "
                  f"{row['step_ratio']:.2f} | {row['predicted_gb']:.3f} | {row['measured_gb']:.3f} | "
                  f"{row['memory_ratio']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": cal, "rows": rows}, indent=1))
    ok = all(0.8 <= r[k] <= 1.25 for r in rows for k in ("step_ratio", "memory_ratio"))
    print(f"all {len(rows)} layouts within 0.8-1.25 (step time and memory): {'yes' if ok else 'no'}; "
          f"{time.time() - t0:.0f} s in all")
    vit = [r for r in rows if r["model"] == "vit"] or rows
    # The last line: predicted / measured of the tiny ViT, step time then peak memory, per layout.
    print("tiny ViT predicted/measured (step time, peak memory) for " + ", ".join(
        f"{r['layout']}: {r['step_ratio']:.2f} {r['memory_ratio']:.2f}" for r in vit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
