"""vitscale's engine against a plain PyTorch loop: the same tiny ViT, batch, optimizer.

One process on CPU (or one GPU). Both sides start from identical weights, use
torch.optim.AdamW with the same hyper-parameters and gradient clipping, and consume the
same pre-rendered uint8 batches (so data generation is out of the comparison). The
vitscale side is a run started as ``vitscale-train`` starts one (``train.setup.plan_run`` /
``start_run``: DeepSpeed engine, ZeRO-0 (ZeRO-1 under bf16, which needs it for fp32 gradient
accumulation: vitscale.config.validation), same precision) stepped by ``train.step.optimizer_step``,
i.e. exactly what the training loop runs per step. Rounds interleave
the two sides and the medians are reported (timings here swing +-10% run to run).

    python benchmarks/overhead.py                     # defaults: tiny ViT, 64 px, batch 32
    python benchmarks/overhead.py --rounds 7 --steps 20 --precision bf16
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/vit_tiny.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per side per round")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = ap.parse_args()

    import tempfile

    import torch

    from vitscale.distributed import init_distributed, shutdown
    from vitscale.train.engine import build_model
    from vitscale.train.optim import param_groups
    from vitscale.train.setup import plan_run, start_run
    from vitscale.train.step import optimizer_step

    zero = 1 if args.precision == "bf16" else 0
    plan = plan_run(args.config, [f"parallel.zero={zero}", f"train.precision={args.precision}", "optim.torch_adam=true",
                                  "optim.schedule=constant", "optim.warmup_steps=1", "log.progress=false",
                                  "data.num_workers=0", "checkpoint.resume=never",
                                  f"run.dir={tempfile.mkdtemp(prefix='vitscale-overhead-')}", *args.overrides],
                    world_size=1)
    dims = init_distributed()
    run = start_run(plan, dims)  # vitscale: the engine and objective the training loop uses
    cfg, t, o = plan.exp.cfg, plan.exp.cfg.train, plan.exp.cfg.optim
    accum = run.accum

    # Identical pre-rendered micro-batches, prepared on the device, for both sides.
    batches = [run.fetch() for _ in range(accum * 8)]
    cursor = {"i": 0}

    def fetch():
        cursor["i"] += 1
        return batches[cursor["i"] % len(batches)]

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

    def timed(step_fn) -> float:
        for _ in range(2):  # warm-up outside the clock
            step_fn()
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step_fn()
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps / (time.perf_counter() - t0)

    plain, ours = [], []
    for r in range(args.rounds):
        order = [(plain, plain_step), (ours, vitscale_step)]
        for results, fn in order if r % 2 == 0 else reversed(order):  # alternate who goes first
            results.append(timed(fn))
    p, v = statistics.median(plain), statistics.median(ours)
    n_params = sum(x.numel() for x in model.parameters())
    print(f"model {cfg.model.name} (depth {model.cfg.depth}, {n_params / 1e6:.2f}M params), "
          f"{cfg.data.image_size} px, batch {t.global_batch} ({accum} x {t.micro_batch}), {t.precision}, "
          f"{dims.device}, torch threads {torch.get_num_threads()}")
    print(f"rounds {args.rounds} x {args.steps} steps; plain steps/s {[round(x, 3) for x in plain]}")
    print(f"rounds {args.rounds} x {args.steps} steps; vitscale steps/s {[round(x, 3) for x in ours]}")
    print(f"plain PyTorch: {p:.3f} steps/s   vitscale (DeepSpeed ZeRO-{zero}): {v:.3f} steps/s   "
          f"ratio vitscale/plain = {v / p:.3f}")
    assert math.isfinite(v / p)
    shutdown()


if __name__ == "__main__":
    main()
