"""Model FLOPs utilisation through ``vitscale-train`` next to a plain PyTorch step, per model.

Per model, one process times two things on synthetic inputs that live on the device (random
images, labels, token ids; no data loading, no disk):

- **plain**: a bare PyTorch step (forward, loss, backward, fused AdamW) under bf16 autocast with
  PyTorch's SDPA attention (flash / memory-efficient kernels on a GPU), optionally
  ``torch.compile``d whole. Its MFU uses ``vitscale.models.flops`` (3 x forward per sample,
  PaLM appendix B).
- **vitscale**: the stack itself: the model's shipped config (``CONFIGS``), started as
  ``vitscale-train`` starts a run (``train.setup.plan_run`` / ``start_run``: the DeepSpeed engine,
  its optimizer, precision and ZeRO stage from the config) and stepped by the training loop
  (``train.loop.train``), whose micro-batches come from a device-side random batch source instead
  of the config's loader. Its samples/s and MFU are read back from the run's ``metrics.jsonl``
  (the loop's global ``throughput`` record, ``train/throughput.py``), not timed here.

The table prints both and the ratio vitscale / plain samples/s: the stack's overhead (or gain).
Both sides run the same batch, precision and model shapes; the stack keeps its config's
recipe (drop path, label smoothing, gradient clipping, ZeRO) except activation checkpointing,
which is turned off as the plain step has none (give ``parallel.activation_checkpoint=1`` as an
override to time it; MFU never counts the recomputation). ``--compile`` compiles both sides
(the stack per block, ``train.compile``). The peak comes from ``PEAK_TFLOPS`` for the device,
or ``--peak-tflops``.

    python benchmarks/mfu.py                                   # GPU: ViT-B/16, L/16, H/14, CLIP L/14 at 224 px
    python benchmarks/mfu.py --model vit_large_patch16 --batch 128 --compile
    python benchmarks/mfu.py --tiny --precision fp32 --peak-tflops 1   # CPU: same models, 2 blocks, 2x2 patches

Goal (issue 21): ViT-L/16 at 45% MFU or more and CLIP ViT-L/14 at 40% on an H100, through
``vitscale-train``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import tempfile
import time
from pathlib import Path

MODELS = ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "clip_vit_l14"]
# The shipped config each model is trained with (configs/).
CONFIGS = {"vit_base_patch16": "configs/vit_base_fdsl.yaml", "vit_large_patch16": "configs/vit_large_fdsl.yaml",
           "vit_huge_patch14": "configs/vit_huge_fdsl.yaml", "clip_vit_l14": "configs/clip_vit_l14_laion.yaml"}
ROOT = Path(__file__).resolve().parent.parent


def tiny_options(name: str) -> dict:
    """--tiny: 2 blocks (per tower), 2 x 2 patches (CLIP: 28 px, 16 tokens)."""
    if name.startswith("clip_"):
        return dict(vision=dict(layers=2, image_size=28), text=dict(layers=2, context_length=16))
    return dict(depth=2, img_size=2 * int(name.rsplit("patch", 1)[1]))


def build(name: str, tiny: bool):
    """The model, a function making one synthetic batch of size b, and a loss over the outputs."""
    import torch
    import torch.nn.functional as F

    from vitscale.models import create_model
    from vitscale.models.losses import create_loss

    if name.startswith("clip_"):
        model = create_model(name, **(tiny_options(name) if tiny else {}))
        v, t = model.cfg.vision, model.cfg.text
        clip_loss = create_loss("clip")

        def batch(b, device):
            return (torch.randint(0, 256, (b, 3, v.image_size, v.image_size), device=device).float() / 255,
                    torch.randint(1, t.vocab_size, (b, t.context_length), device=device)), None

        return model, batch, lambda out, _: clip_loss(*out)
    model = create_model(name, num_classes=1000, **(tiny_options(name) if tiny else dict(img_size=224)))
    size = model.cfg.img_size

    def batch(b, device):
        return (torch.randn(b, 3, size, size, device=device),), torch.randint(0, 1000, (b,), device=device)

    return model, batch, F.cross_entropy


def measure_plain(name: str, batch_size: int, steps: int, warmup: int, precision: str, compile_backend: str | None,
                  tiny: bool, device) -> dict:
    """Train ``name`` for ``warmup`` + ``steps`` plain PyTorch steps on one synthetic batch; time the last ``steps``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitscale.models.flops import forward_flops

    model, make_batch, loss_fn = build(name, tiny)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model, backend=compile_backend) if compile_backend else model
    inputs, target = make_batch(batch_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    # Flash first, then memory-efficient, cuDNN; on CPU torch's own fused kernel.
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION] \
        if device.type == "cuda" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast, sdpa_kernel(backends):
            loss = loss_fn(step_model(*inputs), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    samples_per_s = steps * batch_size / elapsed
    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "samples_per_s": samples_per_s,
              "tflops": samples_per_s * 3 * forward_flops(model) / 1e12}
    del model, optimizer, step_model
    return result


def stack_overrides(name: str, batch_size: int, steps: int, warmup: int, precision: str,
                    compile_backend: str | None, tiny: bool, peak: float | None, run_dir: Path) -> list[str]:
    """The overrides of the model's shipped config for a timed run of ``warmup`` + ``steps`` steps."""
    o = [f"model.name={name}", f"train.micro_batch={batch_size}", f"train.global_batch={batch_size}",
         f"train.precision={precision}", f"train.steps={warmup + steps}", f"log.every={warmup + steps}",
         f"log.warmup_steps={warmup}", "log.progress=false", "log.preview=false",
         "parallel.activation_checkpoint=0",  # as the plain step (MFU counts no recomputation either way)
         # the config's loader is replaced by device-side batches (``device_batches``): a cheap source, no workers
         "data.source=gratings", "data.shards=null", "data.num_workers=0",
         "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never", "eval.every=0",
         f"train.compile={'true' if compile_backend else 'false'}", f"run.dir={run_dir}"]
    if compile_backend:
        o.append(f"train.compile_backend={compile_backend}")
    if precision == "bf16":
        o.append("parallel.zero=1")  # bf16 needs ZeRO >= 1 for its fp32 master weights (config/validation.py)
    if peak:
        o.append(f"log.peak_tflops={peak}")
    if tiny:
        opts = tiny_options(name)
        if name.startswith("clip_"):
            o += [f"data.image_size={opts['vision'].pop('image_size')}",
                  f"model.vision={opts['vision']}".replace("'", ""), f"model.text={opts['text']}".replace("'", "")]
        else:
            o += [f"model.depth={opts['depth']}", f"data.image_size={opts['img_size']}"]
    return o


def device_batches(run, count: int = 2):
    """A fetch function for ``run``: ``count`` random micro-batches (model inputs, target, noise keys),
    made once on the device and cycled, in the shapes and dtype the config's loader would give."""
    import itertools

    import torch

    from vitscale.train.batches import noise_keys

    cfg, exp, device = run.cfg, run.exp, run.dims.device
    mb, size = cfg.train.micro_batch, cfg.data.image_size
    made = []
    for i in range(count):
        images = torch.randn(mb, 3, size, size, device=device).to(run.dtype)
        keys = noise_keys(cfg.train.seed, 0, i, mb, cfg.train.global_batch, run.dims.data_rank, run.dims.data, device)
        if exp.model.kind == "clip":
            text = exp.model.text
            tokens = torch.randint(1, text.vocab_size, (mb, text.context_length), device=device)
            made.append(((images, tokens), tokens, keys))
        else:
            labels = torch.randint(0, cfg.data.num_classes, (mb,), device=device)
            made.append(((images,), labels, keys))
    return itertools.cycle(made).__next__


def measure_stack(name: str, overrides: list[str], dims) -> dict:
    """A ``vitscale-train`` run of ``name``'s shipped config in this process (the process group is
    ``dims``'s), fed by ``device_batches``; its global throughput record from ``metrics.jsonl``."""
    from vitscale.train.loop import train
    from vitscale.train.setup import plan_run, start_run
    from vitscale.train.throughput import read_metrics

    plan = plan_run(str(ROOT / CONFIGS[name]), overrides, world_size=1)
    run = start_run(plan, dims)
    run.fetch = device_batches(run)
    train(run)
    run_dir = plan.exp.cfg.run.dir
    del run, plan
    records = [r for r in read_metrics(run_dir) if r["kind"] == "throughput" and r["scope"] == "global"]
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no global throughput record")
    return {**records[-1], "run_dir": run_dir}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=MODELS, help="repeatable; default all four")
    ap.add_argument("--batch", type=int, default=None, help="per step (default 64 on a GPU, 4 with --tiny)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (the stack: train.compile=true)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default inductor)")
    ap.add_argument("--tiny", action="store_true", help="2 blocks, 2x2 patches: a CPU smoke run of the same code")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default: known-device table)")
    ap.add_argument("--run-dir", default=None, help="folder for the vitscale runs (default: a new temporary one)")
    ap.add_argument("overrides", nargs="*", help="more overrides of the vitscale side's config, key.sub=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitscale.train.setup").setLevel(logging.INFO)  # each run's "speed:" line (train/fast_path.py)

    import torch

    from vitscale.distributed import init_distributed, shutdown
    from vitscale.train.throughput import device_peak_tflops

    dims = init_distributed()
    device = dims.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or device_peak_tflops(device_name)
    batch = args.batch or (4 if args.tiny else 64)
    backend = args.compile_backend if args.compile else None
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="vitscale-mfu-"))
    print(f"device: {device_name}; peak {peak or 'unknown'} TFLOP/s; {args.precision}, SDPA, "
          f"compile={backend or 'off'}, {args.steps} timed steps after {args.warmup}"
          f"{', tiny models' if args.tiny else ''}; vitscale runs in {root}")
    print("| model | params (M) | batch | plain samples/s | plain MFU | vitscale samples/s | vitscale MFU | "
          "vitscale / plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    pct = lambda x: f"{100 * x:.2f}%" if x is not None else "n/a"  # noqa: E731
    for name in args.model or MODELS:
        plain = measure_plain(name, batch, args.steps, args.warmup, args.precision, backend, args.tiny, device)
        gc.collect()
        overrides = stack_overrides(name, batch, args.steps, args.warmup, args.precision, backend, args.tiny, peak,
                                    root / f"{name}-{'compiled' if backend else 'eager'}") + args.overrides
        ours = measure_stack(name, overrides, dims)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        plain_mfu = plain["tflops"] / peak if peak else None
        p, v = round(plain["samples_per_s"], 2), round(ours["samples_per_s"], 2)
        print(f"| {name} | {plain['params_m']:.1f} | {batch} | {p:.2f} | {pct(plain_mfu)} | {v:.2f} | "
              f"{pct(ours['mfu'])} | {v / p:.3f} |", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
