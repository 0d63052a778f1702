"""Model FLOPs utilisation of one training process: samples/s, TFLOP/s and MFU per model.

One process, synthetic inputs (random images, labels, token ids; no data loading), a
plain PyTorch step (forward, loss, backward, fused AdamW) under bf16 autocast with
PyTorch's SDPA attention (flash / memory-efficient kernels on a GPU), optionally
``torch.compile``d. Model FLOPs are ``vitscale.models.flops`` (3 x forward per sample,
PaLM appendix B); the peak comes from ``vitscale.train.throughput.PEAK_TFLOPS`` for the
device, or ``--peak-tflops``.

    python benchmarks/mfu.py                                   # GPU: ViT-B/16, L/16, H/14, CLIP L/14 at 224 px
    python benchmarks/mfu.py --model vit_large_patch16 --batch 128 --compile
    python benchmarks/mfu.py --tiny                            # CPU: the same models at 2 blocks, 2x2 patches

Goal (issue 8): ViT-L/16 at 45% MFU or more on an H100.
"""
from __future__ import annotations

import argparse
import contextlib
import time

MODELS = ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "clip_vit_l14"]


def build(name: str, tiny: bool):
    """The model, a function making one synthetic batch of size b, and a loss over the outputs."""
    import torch
    import torch.nn.functional as F

    from vitscale.models import create_model
    from vitscale.models.losses import create_loss

    if name.startswith("clip_"):
        options = dict(vision=dict(layers=2, image_size=28), text=dict(layers=2, context_length=16)) if tiny else {}
        model = create_model(name, **options)
        v, t = model.cfg.vision, model.cfg.text
        clip_loss = create_loss("clip")

        def batch(b, device):
            return (torch.randint(0, 256, (b, 3, v.image_size, v.image_size), device=device).float() / 255,
                    torch.randint(1, t.vocab_size, (b, t.context_length), device=device)), None

        return model, batch, lambda out, _: clip_loss(*out)
    patch = int(name.rsplit("patch", 1)[1])
    options = dict(depth=2, img_size=2 * patch) if tiny else dict(img_size=224)
    model = create_model(name, num_classes=1000, **options)
    size = model.cfg.img_size

    def batch(b, device):
        return (torch.randn(b, 3, size, size, device=device),), torch.randint(0, 1000, (b,), device=device)

    return model, batch, F.cross_entropy


def measure(name: str, batch_size: int, steps: int, warmup: int, precision: str, compile_: bool, tiny: bool,
            device) -> dict:
    """Train ``name`` for ``warmup`` + ``steps`` steps on synthetic batches; time the last ``steps``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitscale.models.flops import forward_flops

    model, make_batch, loss_fn = build(name, tiny)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_ else model
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
    tflops = samples_per_s * 3 * forward_flops(model) / 1e12
    return {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch_size,
            "samples_per_s": samples_per_s, "tflops": tflops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=MODELS, help="repeatable; default all four")
    ap.add_argument("--batch", type=int, default=None, help="per step (default 64 on a GPU, 4 with --tiny)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--tiny", action="store_true", help="2 blocks, 2x2 patches: a CPU smoke run of the same code")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak (default: known-device table)")
    args = ap.parse_args()

    import torch

    from vitscale.train.throughput import device_peak_tflops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or device_peak_tflops(device_name)
    batch = args.batch or (4 if args.tiny else 64)
    print(f"device: {device_name}; peak {peak or 'unknown'} TFLOP/s; {args.precision}, SDPA, "
          f"compile={args.compile}, {args.steps} timed steps after {args.warmup}{', tiny models' if args.tiny else ''}")
    print("| model | params (M) | batch | samples/s | TFLOP/s | MFU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.model or MODELS:
        r = measure(name, batch, args.steps, args.warmup, args.precision, args.compile, args.tiny, device)
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        print(f"| {name} | {r['params_m']:.1f} | {r['batch']} | {r['samples_per_s']:.1f} | {r['tflops']:.4g} | {mfu} |",
              flush=True)


if __name__ == "__main__":
    main()
