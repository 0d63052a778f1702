"""vitscale's engine against a plain PyTorch loop, and compiled blocks against eager ones.

One process on CPU (or one GPU). Rounds interleave the sides compared and the medians are
reported (timings here swing +-10% run to run).

1. **plain vs vitscale** (``--config``, the tiny ViT by default): both sides start from identical
   weights, use torch.optim.AdamW with the same hyper-parameters and gradient clipping, and
   consume the same pre-rendered uint8 batches (so data generation is out of the comparison).
   The vitscale side is a run started as ``vitscale-train`` starts one (``train.setup.plan_run`` /
   ``start_run``: DeepSpeed engine, ZeRO-0 (ZeRO-1 under bf16, which needs it for fp32 gradient
   accumulation: vitscale.config.validation), same precision) stepped by
   ``train.step.optimizer_step``, i.e. exactly what the training loop runs per step.
2. **compiled vs eager** (``--compile-configs``, the tiny ViT and the tiny CLIP by default): two
   vitscale runs of each config, ``train.compile=false`` and ``train.compile=true`` with
   ``--compile-backend`` (inductor by default; aot_eager traces the same graphs without code
   generation and compiles in seconds), stepped by ``optimizer_step`` on the same pre-rendered
   batches. Compilation happens in the warm-up steps, outside the clock.

    python benchmarks/overhead.py                     # defaults: tiny ViT, 64 px, batch 32; tiny ViT + CLIP compiled
    python benchmarks/overhead.py --rounds 7 --steps 20 --precision bf16
    python benchmarks/overhead.py --compile-backend aot_eager --compile-configs configs/clip_tiny.yaml
    python benchmarks/overhead.py --compile-configs   # plain vs vitscale only
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def interleaved(sides: dict, rounds: int, steps: int, device, warmup: int = 2) -> dict:
    """Steps/s of each side (name -> step function): ``rounds`` rounds of ``steps`` timed steps per
    side after ``warmup`` untimed steps each, the order rotated every round. Returns name -> list per round."""
    import torch

    def timed(step_fn) -> float:
        for _ in range(warmup):  # warm-up outside the clock (compilation happens here)
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)

    results = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # alternate who goes first
            results[name].append(timed(sides[name]))
    return results


def start(config: str, overrides: list[str], dims, precision: str):
    """A vitscale run of ``config`` as ``vitscale-train`` starts it, in this process (group ``dims``)."""
    from vitscale.train.setup import plan_run, start_run

    zero = 1 if precision == "bf16" else 0
    plan = plan_run(config, [f"parallel.zero={zero}", f"train.precision={precision}", "optim.torch_adam=true",
                             "optim.schedule=constant", "optim.warmup_steps=1", "log.progress=false",
                             "data.num_workers=0", "checkpoint.resume=never", "log.preview=false",
                             f"run.dir={tempfile.mkdtemp(prefix='vitscale-overhead-')}", *overrides], world_size=1)
    return plan, start_run(plan, dims)


def cycling(batches: list):
    """A fetch function over pre-rendered micro-batches."""
    cursor = {"i": 0}

    def fetch():
        cursor["i"] += 1
        return batches[cursor["i"] % len(batches)]

    return fetch


def plain_vs_vitscale(args, dims) -> None:
    import torch

    from vitscale.train.engine import build_model
    from vitscale.train.optim import param_groups
    from vitscale.train.step import optimizer_step

    plan, run = start(args.config, args.overrides, dims, args.precision)
    cfg, t, o = plan.exp.cfg, plan.exp.cfg.train, plan.exp.cfg.optim
    accum = run.accum
    fetch = cycling([run.fetch() for _ in range(accum * 8)])  # identical micro-batches for both sides

    # plain PyTorch: same weights, same loss, same optimizer and clipping.
    model = build_model(plan.exp).to(dims.device, run.dtype)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay, set(plan.exp.model.no_weight_decay)), lr=t.lr,
                            betas=tuple(o.betas), eps=o.eps)

    def plain_step():
        for _ in range(accum):
            inputs, target, keys = fetch()
            loss = run.objective(model(*inputs, noise=keys), target) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def vitscale_step():
        optimizer_step(run.steps, fetch, accum, run.objective)

    res = interleaved({"plain": plain_step, "vitscale": vitscale_step}, args.rounds, args.steps, dims.device)
    p, v = statistics.median(res["plain"]), statistics.median(res["vitscale"])
    n_params = sum(x.numel() for x in model.parameters())
    print(f"model {cfg.model.name} (depth {model.cfg.depth}, {n_params / 1e6:.2f}M params), "
          f"{cfg.data.image_size} px, batch {t.global_batch} ({accum} x {t.micro_batch}), {t.precision}, "
          f"{dims.device}, torch threads {torch.get_num_threads()}")
    print(f"rounds {args.rounds} x {args.steps} steps; plain steps/s {[round(x, 3) for x in res['plain']]}")
    print(f"rounds {args.rounds} x {args.steps} steps; vitscale steps/s {[round(x, 3) for x in res['vitscale']]}")
    print(f"plain PyTorch: {p:.3f} steps/s   vitscale (DeepSpeed ZeRO-{plan.exp.cfg.parallel.zero}): {v:.3f} steps/s   "
          f"ratio vitscale/plain = {v / p:.3f}", flush=True)
    assert math.isfinite(v / p)


def compiled_vs_eager(config: str, args, dims) -> None:
    from vitscale.train.step import optimizer_step

    runs = {}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        runs[name] = start(config, [f"train.compile={compile_}", f"train.compile_backend={args.compile_backend}",
                                    *args.overrides], dims, args.precision)
    plan, eager = runs["eager"]
    t = plan.exp.cfg.train
    fetch = cycling([eager.fetch() for _ in range(eager.accum * 8)])  # the same micro-batches for both
    sides = {name: (lambda run=run: optimizer_step(run.steps, fetch, run.accum, run.objective))
             for name, (_, run) in runs.items()}
    res = interleaved(sides, args.rounds, args.steps, dims.device, args.warmup)
    e, c = statistics.median(res["eager"]), statistics.median(res["compiled"])
    print(f"model {plan.exp.cfg.model.name} ({plan.exp.model.parameters / 1e6:.2f}M params, {config}), "
          f"{plan.exp.cfg.data.image_size} px, batch {t.global_batch} ({eager.accum} x {t.micro_batch}), "
          f"{t.precision}, compile backend {args.compile_backend}")
    for name in runs:
        print(f"rounds {args.rounds} x {args.steps} steps; {name} steps/s {[round(x, 3) for x in res[name]]}")
    print(f"eager: {e:.3f} steps/s   compiled ({args.compile_backend}): {c:.3f} steps/s   "
          f"ratio compiled/eager = {c / e:.3f}", flush=True)
    assert math.isfinite(c / e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vit_tiny.yaml", help="plain vs vitscale; '' to skip")
    ap.add_argument("--compile-configs", nargs="*", default=["configs/vit_tiny.yaml", "configs/clip_tiny.yaml"],
                    help="compiled vs eager for each (none: skip)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (train.compile_backend)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side per round (compiled vs eager: "
                    "the first round's compile graphs with and without gradients, and again with dynamic shapes)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    args = ap.parse_args()

    import torch

    from vitscale.distributed import init_distributed, shutdown

    dims = init_distributed()
    print(f"{dims.device}, torch threads {torch.get_num_threads()}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.config:
        plain_vs_vitscale(args, dims)
    for config in args.compile_configs:
        compiled_vs_eager(config, args, dims)
    shutdown()


if __name__ == "__main__":
    main()
