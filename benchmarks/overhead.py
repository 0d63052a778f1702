"""vitscale's engine against a plain PyTorch loop: the same tiny ViT, batch, optimizer.

One process on CPU (or one GPU). Both sides start from identical weights, use
torch.optim.AdamW with the same hyper-parameters and gradient clipping, and consume the
same pre-rendered uint8 batches (so data generation is out of the comparison). The
vitscale side runs ``vitscale.train.loop.train_step`` on a DeepSpeed engine (ZeRO-0,
same precision), i.e. exactly what the training loop runs per step. Rounds interleave
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

    import torch
    import torch.nn.functional as F

    from vitscale.config import compose_ds_config, load_config, validate_layout
    from vitscale.data.synthetic_loader import build_synthetic_loader
    from vitscale.data.transforms import normalize
    from vitscale.distributed import init_distributed, shutdown
    from vitscale.train.engine import build_engine, build_model, compute_dtype, param_groups
    from vitscale.train.loop import train_step

    cfg = load_config(args.config, ["parallel.zero=0", f"train.precision={args.precision}", "optim.torch_adam=true",
                                    "optim.schedule=constant", "optim.warmup_steps=1", "log.progress=false",
                                    *args.overrides])
    t, o = cfg.train, cfg.optim
    layout = validate_layout(cfg, 1)
    dims = init_distributed()
    dtype = compute_dtype(t.precision)
    accum = layout.grad_accum

    # Identical pre-rendered micro-batches for both sides.
    loader = iter(build_synthetic_loader(cfg.data.source, cfg.data.num_classes, cfg.data.image_size,
                                         cfg.data.instances, t.seed, t.micro_batch, t.global_batch, 0, 1,
                                         num_workers=0))
    batches = [next(loader) for _ in range(accum * 8)]
    cursor = {"i": 0}

    def fetch():
        cursor["i"] += 1
        return batches[cursor["i"] % len(batches)]

    def prepare(images, labels):
        return normalize(images.to(dims.device), cfg.data.mean, cfg.data.std, dtype), labels.to(dims.device)

    # vitscale: the DeepSpeed engine and the loop's own step function.
    engine = build_engine(cfg, dims, compose_ds_config(cfg, 1))

    # plain PyTorch: same weights, same optimizer and clipping.
    model = build_model(cfg).to(dims.device, dtype)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=t.lr, betas=tuple(o.betas), eps=o.eps)

    def plain_step():
        for _ in range(accum):
            images, labels = prepare(*fetch())
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=t.label_smoothing) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def vitscale_step():
        train_step(engine, fetch, accum, prepare, t.label_smoothing)

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
    print(f"plain PyTorch: {p:.3f} steps/s   vitscale (DeepSpeed ZeRO-0): {v:.3f} steps/s   "
          f"ratio vitscale/plain = {v / p:.3f}")
    assert math.isfinite(v / p)
    shutdown()


if __name__ == "__main__":
    main()
