"""The planner (``vitscale.planner``) checked against what this machine measures (issue 23).

1. Calibrate the CPU as a device kind, from micro-benchmarks only (two processes at once, as the
   runs have two ranks, so both share the cores as the runs do):
   - the achieved FLOP/s of a forward + backward in plain PyTorch on synthetic inputs (no data
     loading, no DeepSpeed) of the model, whole or as one of two tensor shards (split as a run
     splits it, each process in a one-rank group: no exchange), FLOPs from ``models/flops.py``;
     sustained for 1.5 s and measured right before and after each run (this machine's cores
     are shared with other jobs: the run's rate is the mean of the two next to it). The rate of
     one transformer block alone is printed beside it, with the share the rest of the model adds;
   - gloo all-reduce between the two processes at 4 KB - 16 MB (the tiny models' gradients are
     15 MB and less): latency and bandwidth by a least-squares fit of t = 2 lat + S / bw (a ring
     of two);
   - AdamW's parameters per second on a flat buffer of the model's size;
   - the framework's own time per micro-batch and resident size in each layout: a run of the same
     config with 16-wide blocks (same modules, data, layout; a few hundredths of the FLOPs and
     bytes), less what the planner predicts for that hollow model.
2. Run the tiny ViT and the tiny CLIP (``configs/vit_tiny.yaml``, ``configs/clip_tiny.yaml``) in
   data 2, tensor 2, pipe 2 and ZeRO-3 with the deepspeed launcher (2 processes), reading the
   median step time after warm-up from ``metrics.jsonl`` (``step_time_s_p50``) and each rank's
   peak resident size (``VmHWM``).
3. Print predicted vs measured side by side with the ratios; the last line holds the tiny ViT's
   predicted / measured step time and peak memory ratios of the four layouts.

    python benchmarks/plan_check.py                      # 10-14 minutes on 2 shared cores
    python benchmarks/plan_check.py --models vit --steps 40

Layouts not started within ``--budget-s`` (default 720 s) are left out (and said so), so that the
ViT's line still comes last within a 15-minute limit on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
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


def _sustained(fn, seconds: float = 1.5, warmup_s: float = 0.3) -> float:
    """Mean seconds per call of ``fn`` called back to back for ``seconds`` (after ``warmup_s``): the
    pace a long-running process keeps on a shared CPU. A short burst right after a wait runs on the
    scheduler's credit for the wait and is faster than a training process's steady share."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return elapsed / calls


def _worker(rank: int, port: int, configs: dict, commands, results) -> None:
    """One of the two calibration processes: answers ``Calibrator.ask`` until told to stop."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import copy
    import resource

    import torch
    import torch.distributed as dist

    import deepspeed  # noqa: F401  the training stack, for the framework's resident size
    import vitscale.train.loop  # noqa: F401
    import vitscale.train.setup  # noqa: F401
    from vitscale.experiment import load_experiment
    from vitscale.models.flops import forward_flops
    from vitscale.models.tensor_parallel import parallelize_vit

    dist.init_process_group("gloo", rank=rank, world_size=2)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    torch.manual_seed(rank)
    # each rank's own one-rank group: a tensor-split block computes its shard without exchanging it
    own = [dist.new_group([r]) for r in range(2)][rank]
    models = {key: load_experiment(config) for key, config in configs.items()}
    built = {key: exp.model.create().train() for key, exp in models.items()}

    def block_rate(key: str, tensor: int) -> float:
        """Achieved FLOP/s of the model's blocks (forward + backward) whole or as one of ``tensor`` shards."""
        mb, rates, shares = models[key].cfg.train.micro_batch, [], []
        for block, tokens in _blocks(built[key]):
            width = next(p for p in block.parameters() if p.dim() == 2).shape[1]
            flops = 3 * _block_flops(block, tokens) * mb / tensor
            shard = parallelize_vit(copy.deepcopy(block), rank, tensor, own) if tensor > 1 else block
            x = torch.randn(mb, tokens, width, requires_grad=True)
            dist.barrier()
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            rates.append((flops, _sustained(lambda: shard(x).sum().backward())))
            shares.append((time.thread_time() - cpu0) / (time.perf_counter() - wall0))
        # FLOP-weighted over the stacks; and the share of a core this process had meanwhile
        return sum(f for f, _ in rates) / sum(t for _, t in rates), statistics.fmean(shares)

    def step_of(key: str, model):
        """One plain PyTorch forward + backward of ``model`` on a synthetic micro-batch (no data loading)."""
        exp = models[key]
        mb = exp.cfg.train.micro_batch
        if exp.model.kind == "clip":
            v, t = exp.model.arch.vision, exp.model.arch.text
            inputs = (torch.randn(mb, 3, v.image_size, v.image_size),
                      torch.randint(1, t.vocab_size, (mb, t.context_length)))
            return lambda: sum(o.float().sum() for o in model(*inputs)[:2]).backward()
        size = exp.cfg.data.image_size
        inputs, labels = (torch.randn(mb, 3, size, size),), torch.zeros(mb, dtype=torch.long)
        return lambda: torch.nn.functional.cross_entropy(model(*inputs), labels).backward()

    shards = {}

    def model_rate(key: str, tensor: int) -> tuple[float, float]:
        """Achieved FLOP/s of the whole model's forward + backward in plain PyTorch, whole or as one of
        ``tensor`` shards (its own one-rank group: no exchange), and the share of a core meanwhile."""
        if (key, tensor) not in shards:
            model = built[key] if tensor == 1 else parallelize_vit(copy.deepcopy(built[key]), rank, tensor, own)
            shards[key, tensor] = step_of(key, model)
        flops = 3 * forward_flops(built[key]) * models[key].cfg.train.micro_batch / tensor
        dist.barrier()
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        seconds = _sustained(shards[key, tensor])
        return flops / seconds, (time.thread_time() - cpu0) / (time.perf_counter() - wall0)

    def base() -> dict:
        out = {"framework_gb": rss_gb, "models": {}}
        for key, exp in models.items():
            model, mb = built[key], exp.cfg.train.micro_batch
            # the whole model against its blocks: the share the rest (embedding, head, loss) adds
            rate = block_rate(key, 1)[0]
            dist.barrier()
            whole_s = _sustained(step_of(key, model))
            params = sum(p.numel() for p in model.parameters())
            flat = torch.nn.Parameter(torch.zeros(params))
            flat.grad = torch.randn(params)
            adam = torch.optim.AdamW([flat], lr=1e-3)
            dist.barrier()
            adam_s = _time(adam.step)
            out["models"][key] = {"block_flops_per_s": rate, "whole_s": whole_s,
                                  "rest_fraction": max(0.0, whole_s * rate / (3 * forward_flops(model) * mb) - 1),
                                  "adam_params_per_s": params / adam_s}
        sizes, times = [2**k for k in range(10, 23, 2)], []  # 1 Ki - 4 Mi fp32 elements: 4 KB - 16 MB
        for n in sizes:
            buf = torch.ones(n)
            # back to back, about 2 s of traffic at 1 GB/s, the same count on both ranks; the mean pace,
            # as a training process keeps it (not the median of bursts)
            repeats = min(2000, max(30, int(2e9 / (4 * n) / 8)))
            dist.barrier()
            _time(lambda: dist.all_reduce(buf), repeats=1, warmup=5)
            start = time.perf_counter()
            for _ in range(repeats):
                dist.all_reduce(buf)
            times.append((time.perf_counter() - start) / repeats)
        # t = 2 lat + S / bw for a ring of two (all-reduce moves 2 (n-1)/n = 1 x the buffer)
        xs, ys = [4 * n for n in sizes], times
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out["allreduce_bw_gbs"] = 1 / max(slope, 1e-12) / 1e9
        out["latency_us"] = max(1.0, (my - slope * mx) / 2 * 1e6)
        return out

    while True:
        command = commands.get()
        if command[0] == "stop":
            break
        results.put((rank, base() if command[0] == "base" else model_rate(*command[1:])))
    dist.barrier()
    dist.destroy_process_group()


class Calibrator:
    """The two calibration processes, kept for the whole check: the block rates are measured again
    next to each run, so that they see the load the run sees (this machine's cores are shared)."""

    def __init__(self, configs: dict):
        import torch.multiprocessing as mp

        from vitscale.distributed import free_port

        ctx = mp.get_context("spawn")
        self.commands, self.results = [ctx.Queue(), ctx.Queue()], ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, port, configs, self.commands[r], self.results))
                      for r in range(2)]
        for p in self.procs:
            p.start()

    def ask(self, *command) -> list:
        for q in self.commands:
            q.put(command)
        answers = dict(self.results.get(timeout=600) for _ in self.procs)
        return [answers[0], answers[1]]

    def base(self) -> dict:
        """All-reduce bandwidth and latency (rank 0's fit), Adam's rate, the rest-of-model share and the
        framework's resident size (averaged over the two processes, the size their largest)."""
        both = self.ask("base")
        out = both[0]
        for key in out["models"]:
            for field in ("block_flops_per_s", "rest_fraction", "adam_params_per_s"):
                out["models"][key][field] = statistics.fmean(r["models"][key][field] for r in both)
        out["framework_gb"] = max(r["framework_gb"] for r in both)
        return out

    def rate(self, key: str, tensor: int) -> tuple[float, float]:
        """The whole model's FLOP/s in plain PyTorch (one of ``tensor`` shards) and the share of a core
        each process had while measuring (averaged over the two)."""
        both = self.ask("blocks", key, tensor)
        return statistics.fmean(r for r, _ in both), statistics.fmean(c for _, c in both)  # (FLOP/s, core share)

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for p in self.procs:
            p.join(timeout=60)


def cpu_kind(cal: dict, model: str, rate: float, overhead_s: float = 0.0, framework_gb: float | None = None):
    """The CPU as a planner device kind: the model's measured FLOP/s in plain PyTorch, gloo's bandwidth
    and latency, Adam's rate; the framework's per-micro-batch
    time and resident size from the hollow run where given."""
    from vitscale.planner import DeviceKind

    m = cal["models"][model]
    return DeviceKind("cpu", peak_tflops=rate / 1e12, efficiency=1.0, mem_gb=1e6,
                      mem_bw_gbs=1.0, intra_bw_gbs=cal["allreduce_bw_gbs"], inter_bw_gbs=cal["allreduce_bw_gbs"],
                      latency_us=cal["latency_us"],
                      framework_gb=cal["framework_gb"] if framework_gb is None else framework_gb,
                      fused_attention=True,  # torch's CPU SDPA is a fused kernel: no scores kept
                      overhead_s=overhead_s, optimizer_params_per_s=m["adam_params_per_s"])


def framework(cal: dict, model: str, config: str, layout: tuple, rate: float, measured: dict) -> tuple:
    """The framework's per-micro-batch time and resident size in this layout: the hollow model's run
    (``HOLLOW``: the same config, layout, data and modules with 16-wide blocks) less what the planner
    predicts for the hollow model itself."""
    from vitscale.experiment import load_experiment
    from vitscale.planner import Machine, model_shape, plan_layout

    _, pipe, tensor, zero = layout
    exp = load_experiment(config, HOLLOW[model])
    bare = plan_layout(exp, Machine(2, 2, cpu_kind(cal, model, rate, framework_gb=0.0), 1e6), model_shape(exp),
                       pipe, tensor, zero, "none", False, exp.cfg.train.micro_batch)
    slots = bare.grad_accum + pipe - 1  # micro-batch slots of a step (1F1B: m + p - 1)
    return max(0.0, measured["step_s"] - bare.step_s) / slots, max(0.0, measured["rss_gb"] - bare.memory_gb)


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


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _watch(proc, peaks: dict[int, float], cpu: list) -> None:
    """Until ``proc`` ends: the peak resident size (VmHWM) of each rank under it, and (wall time, CPU
    seconds of every process under it so far) samples."""
    used: dict[int, float] = {}
    while proc.poll() is None:
        tree = _descendants(proc.pid)
        for pid in tree:
            if (c := _cpu_s(pid)) is not None:
                used[pid] = c
        cpu.append((time.time(), sum(used.values())))
        for pid, par in tree.items():
            # a rank: a process started by the per-node launcher (launch.py), not one of its forks
            try:
                parent_cmd = Path(f"/proc/{par}/cmdline").read_bytes()
            except OSError:
                continue
            if b"deepspeed.launcher.launch" in parent_cmd and (hwm := _hwm_gb(pid)) is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), hwm)
        time.sleep(0.25)


def run(config: str, overrides: list[str], run_dir: Path) -> dict:
    """Train with the deepspeed launcher on 2 processes; the median step time after warm-up and the
    largest peak resident size of a rank (its loader workers and the launchers left out)."""
    from vitscale.distributed import free_port

    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "vitscale.train",
           config, *overrides, *FIXED, f"run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    peaks: dict[int, float] = {}
    cpu: list[tuple[float, float]] = []
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            _watch(proc, peaks, cpu)
        except BaseException:  # Ctrl-C: the launcher and its ranks go too
            os.killpg(proc.pid, 9)
            raise
    if proc.returncode != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(keepends=True)[-12:])
        raise RuntimeError(f"{config} {' '.join(overrides)} failed (exit {proc.returncode}):\n{tail}")
    from vitscale.train.throughput import read_metrics

    glob = [r for r in read_metrics(run_dir) if r.get("kind") == "throughput" and r.get("scope") == "global"]

    def cpu_at(t: float) -> float:
        return min(cpu, key=lambda sample: abs(sample[0] - t))[1]

    first, last = glob[0], glob[-1]  # CPU seconds per step between the first and the last timed record
    cpu_per_step = (cpu_at(last["time"]) - cpu_at(first["time"])) / max(1, last["step"] - first["step"])
    return {"step_s": last["step_time_s_p50"], "rss_gb": max(peaks.values()) if peaks else float("nan"),
            "cpu_s_per_step": cpu_per_step}


def checks(calibrator: Calibrator, cal: dict, models: list[str], steps: int, out: Path, deadline: float) -> list[dict]:
    """Predict and run each model in each layout; print the rows as they come."""
    from vitscale.experiment import load_experiment
    from vitscale.planner import Machine, model_shape, plan_layout

    rows = []
    print("| model | layout | GFLOP/s | hollow step s | hollow RSS GB | predicted step s | measured step s | ratio | "
          "predicted RSS GB | measured RSS GB | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for m in models:
        exp = load_experiment(CONFIGS[m])
        shape = model_shape(exp)
        for layout in LAYOUTS:
            name, pipe, tensor, zero = layout
            if time.time() > deadline:
                print(f"| {m} | {name} | left out: --budget-s spent |", flush=True)
                continue
            overrides = [f"parallel.pipe={pipe}", f"parallel.tensor={tensor}", f"parallel.zero={zero}",
                         f"train.steps={steps}", "log.every=5", "log.warmup_steps=5"]
            # block rates measured before and after each run: the run's own is their mean
            rates = [calibrator.rate(m, tensor)]
            try:
                hollow = run(CONFIGS[m], overrides + HOLLOW[m], out / f"{m}_{name}_hollow")
                rates.append(calibrator.rate(m, tensor))
                measured = run(CONFIGS[m], overrides, out / f"{m}_{name}")
            except RuntimeError as e:  # one failed run (e.g. a rank stalled on the shared machine): say so, go on
                print(f"| {m} | {name} | run failed: {str(e).splitlines()[0][:160]} |", flush=True)
                continue
            rates.append(calibrator.rate(m, tensor))
            overhead_s, framework_gb = framework(cal, m, CONFIGS[m], layout, (rates[0][0] + rates[1][0]) / 2, hollow)
            rate = (rates[1][0] + rates[2][0]) / 2
            machine = Machine(2, 2, cpu_kind(cal, m, rate, overhead_s, framework_gb), 1e6)
            predicted = plan_layout(exp, machine, shape, pipe, tensor, zero, "none", False, exp.cfg.train.micro_batch)
            row = {"model": m, "layout": name, "block_flops_per_s": rates, "hollow": hollow,
                   "framework_s_per_micro_batch": overhead_s, "framework_gb": framework_gb,
                   "predicted_step_s": predicted.step_s, "measured_step_s": measured["step_s"],
                   "step_ratio": predicted.step_s / measured["step_s"], "predicted_gb": predicted.memory_gb,
                   "measured_gb": measured["rss_gb"], "memory_ratio": predicted.memory_gb / measured["rss_gb"],
                   "measured": measured, "predicted": predicted.row()}
            rows.append(row)
            print(f"| {m} | {name} | {rate / 1e9:.1f} | {hollow['step_s']:.4f} | {hollow['rss_gb']:.3f} | "
                  f"{row['predicted_step_s']:.4f} | {row['measured_step_s']:.4f} | {row['step_ratio']:.2f} | "
                  f"{row['predicted_gb']:.3f} | {row['measured_gb']:.3f} | {row['memory_ratio']:.2f} |", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,clip", help="vit, clip or both (default vit,clip)")
    ap.add_argument("--steps", type=int, default=25, help="steps per run (default 25; the first 5 are warm-up)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--budget-s", type=float, default=720, help="start no layout after this many seconds (720)")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or set(models) - set(CONFIGS):
        ap.error(f"--models must name vit and / or clip, got {args.models}")
    if args.steps < 10:
        ap.error("--steps must be >= 10 (5 warm-up steps, then at least one log interval)")
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout ends the runs under us too
    t0 = time.time()
    calibrator = Calibrator({m: CONFIGS[m] for m in models})
    try:
        cal = calibrator.base()
        print(f"calibration ({time.time() - t0:.0f} s): gloo all-reduce {cal['allreduce_bw_gbs']:.2f} GB/s, latency "
              f"{cal['latency_us']:.0f} us; framework imports {cal['framework_gb']:.3f} GB resident", flush=True)
        for m in models:
            c = cal["models"][m]
            print(f"  {m}: block {c['block_flops_per_s'] / 1e9:.2f} GFLOP/s, the rest of the model adds "
                  f"{100 * c['rest_fraction']:.0f}%, AdamW {c['adam_params_per_s'] / 1e6:.0f} M params/s", flush=True)
        rows = checks(calibrator, cal, models, args.steps,
                      Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="plan_check.")), t0 + args.budget_s)
    finally:
        calibrator.close()
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
