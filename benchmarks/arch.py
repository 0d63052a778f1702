"""Training speed of the architecture options (issue 11) against the plain ViT, in one run.

For each model size, four variants train side by side on one device (one process; CPU
here, a GPU when there is one), each a forward + backward + AdamW step on the same
random uint8 batches:

- ``plain``: the sequential pre-norm ViT.
- ``vit22b``: ViT-22B's recipe: parallel blocks (fused in/out projections), QK-norm, no
  QKV / LayerNorm biases. Same FLOPs as ``plain`` (the fused matrices hold the same products).
- ``soft_moe``: the last half of the blocks with Soft MoE MLPs, 8 experts with
  ceil(tokens / 8) slots each, so experts x slots ~ tokens: the expert MLPs cost what the
  dense MLPs cost (equal FLOPs up to the dispatch / combine products); 8x the MLP parameters.
- ``packed``: NaViT packing: sequences of the plain model's token count filled with images
  whose longest side is sampled in [img/2, img] (aspect kept), factorized positions,
  average pooling. Equal FLOPs per sequence; images/s counts the images the sequences hold.
- ``sparse_2_4``: the plain ViT with 2:4 weight sparsity on the blocks' linears (``model.sparsity``,
  ``vitscale.train.sparsity``): dense kernels on masked weights plus the mask re-applied after every
  optimizer step, so the same train FLOPs as ``plain`` (the row shows the masking's cost; a 2:4 sparse
  kernel, ``torch.sparse.to_sparse_semi_structured`` on a GPU that has one, is not used in training).
- ``adatape``: AdaTape (issue 25) with an input bank (the image in 8 px patches) and 8 tape slots;
  FLOPs count every slot (read or masked: the blocks run on all of them).
- ``distill``: the plain model as a student of a frozen teacher of the same size (issue 25,
  ``train.distill``: soft KL, alpha 0.5); the teacher's forward (no backward) runs every step, and
  TFLOP/s / GFLOP per sample count it (3 x student + 1 x teacher forward).

And for each CLIP size (``--clip-models``), captioning pre-training against the contrastive CLIP
it replaces (issue 25), on the same random images and random captions:

- ``clip``: both towers, the contrastive loss over the batch (one process).
- ``cappa``: the image tower and a text decoder (``--decoder-layers`` / ``--decoder-width``,
  ``--decoder-heads``: the model.decoder defaults), 75 % of each batch by parallel
  prediction, the rest autoregressive (``train.objective=cappa``); no text tower.

Rounds interleave the variants (timings swing run to run); medians are reported.
samples/s is images/s; TFLOP/s counts 3 x the forward FLOPs of ``vitscale.models.flops``
(what really runs, packing padding included); MFU = TFLOP/s / ``--peak-tflops`` (no
default: a CPU has no meaningful peak in our table).

    python benchmarks/arch.py                                   # tiny and base ViT/16 at 64 px, batch 8
    python benchmarks/arch.py --models vit_large_patch16 --img 224 --batch 32 --peak-tflops 989  # an H100, bf16
    python benchmarks/arch.py --models --clip-models clip_vit_b16 --img 224 --batch 32 --decoder-layers 6 \
        --decoder-width 768 --decoder-heads 12                      # CapPa vs CLIP, the paper's B/16 decoder
"""
from __future__ import annotations

import argparse
import math
import statistics
import time


def _variants(tokens: int, img: int) -> dict[str, dict]:
    slots = math.ceil(tokens / 8)
    return {
        "plain": {},
        "vit22b": dict(parallel_block=True, qk_norm=True, qkv_bias=False, norm_bias=False),
        "soft_moe": dict(moe_experts=8, moe_slots=slots),  # moe_blocks is set per model: the last half
        "packed": dict(pos_embed="factorized", class_token=False, global_pool="avg"),
        "adatape": dict(adatape_bank="input", adatape_bank_size=(img // 8) ** 2, adatape_max_tokens=8),
        "distill": {},  # the plain student; its teacher is added below
        "sparse_2_4": {},  # the plain model; its masks are set below
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["vit_tiny_patch16", "vit_base_patch16"])
    ap.add_argument("--img", type=int, default=64, help="image side, pixels (packing: the largest side)")
    ap.add_argument("--batch", type=int, default=8, help="images (packed: sequences) per step")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (after one warm-up)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    ap.add_argument("--clip-models", nargs="*", default=["clip_tiny"], help="CLIP sizes: CapPa against the CLIP")
    ap.add_argument("--decoder-layers", type=int, default=2, help="CapPa's decoder blocks (model.decoder.layers)")
    ap.add_argument("--decoder-width", type=int, default=64, help="CapPa's decoder width (model.decoder.width)")
    ap.add_argument("--decoder-heads", type=int, default=4, help="CapPa's decoder heads (model.decoder.heads)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from vitscale.config.schema import SparsityConfig
    from vitscale.data.packing import pack_batches, normalize_patches
    from vitscale.models import create_model
    from vitscale.models.flops import forward_flops, packed_forward_flops
    from vitscale.train.sparsity import Sparsity

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    mean = torch.full((3,), 0.5, device=device)
    std = torch.full((3,), 0.5, device=device)
    images = [(torch.randint(0, 256, (args.batch, 3, args.img, args.img), dtype=torch.uint8, generator=gen),
               torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(4)]

    rows = []
    for name in args.models:
        base = dict(img_size=args.img, num_classes=args.classes)
        with torch.device("meta"):
            probe = create_model(name, **base).cfg
        runs = {}
        for variant, options in _variants(probe.seq_len, args.img).items():
            torch.manual_seed(0)
            if variant == "soft_moe":
                options = {**options, "moe_blocks": probe.depth // 2}
            model = create_model(name, **base, **options).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if variant == "packed":
                seq_len = probe.seq_len  # the plain model's tokens per image: equal FLOPs per sequence
                batches = list(pack_batches(images * 8, args.batch, patch_size=probe.patch_size, seq_len=seq_len,
                                            max_images=16, max_size=args.img, min_size=args.img // 2, seed=0))[:4]
                inputs = [((normalize_patches(p.to(device), mean, std, dtype), c.to(device), s.to(device)),
                           y.to(device)) for p, c, s, y in batches]
                per_step = statistics.mean(int((y >= 0).sum()) for _, y in inputs)
                flops = packed_forward_flops(model.cfg, seq_len, 16) * args.batch
            else:
                inputs = [(((x.to(device).to(dtype) / 127.5 - 1.0),), y.to(device)) for x, y in images]
                per_step, flops = args.batch, forward_flops(model.cfg) * args.batch
            runs[variant] = dict(model=model, opt=opt, inputs=inputs, images=per_step, train_flops=3 * flops, times=[])
            if variant == "distill":  # a frozen teacher of the same size: forward only
                teacher = create_model(name, **base).to(device).to(dtype).eval().requires_grad_(False)
                runs[variant].update(teacher=teacher, train_flops=4 * flops)
            if variant == "sparse_2_4":
                sparsity = Sparsity(SparsityConfig(pattern="2:4"), 1, model)
                sparsity.update(0)
                sparsity.apply_()
                runs[variant]["sparsity"] = sparsity

        def step(run, i):
            x, y = run["inputs"][i % len(run["inputs"])]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = run["model"](*x)
            if out.dim() == 3:  # packed: per image slot
                y = y[:, :out.shape[1]].flatten()
                out, y = out.flatten(0, 1)[y >= 0], y[y >= 0]
            loss = F.cross_entropy(out.float(), y)
            if "teacher" in run:  # train.distill's soft loss, T = 1, alpha = 0.5
                with torch.no_grad():
                    target = run["teacher"](*x).float()
                kl = F.kl_div(out.float().log_softmax(-1), target.log_softmax(-1), reduction="batchmean", log_target=True)
                loss = 0.5 * loss + 0.5 * kl
            loss.backward()
            run["opt"].step()
            if "sparsity" in run:  # what training with model.sparsity adds to a step
                run["sparsity"].apply_()
            run["opt"].zero_grad(set_to_none=True)

        for run in runs.values():  # warm-up (allocator, kernels) outside the timings
            step(run, 0)
        for _ in range(args.rounds):  # interleaved rounds
            for run in runs.values():
                sync()
                start = time.perf_counter()
                for i in range(args.steps):
                    step(run, i)
                sync()
                run["times"].append((time.perf_counter() - start) / args.steps)
        for variant, run in runs.items():
            step_s = statistics.median(run["times"])
            tflops = run["train_flops"] / step_s / 1e12
            mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "n/a"
            rows.append((name, variant, run["images"] / step_s, tflops, mfu,
                         sum(p.numel() for p in run["model"].parameters()) / 1e6,
                         run["train_flops"] / args.batch / 1e9))
        del runs

    rows += _caption_rows(args, device, dtype, sync, gen)

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), {args.precision}, {args.img} px, batch {args.batch}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| model | variant | images/s | TFLOP/s | MFU | params (M) | GFLOP per sample (train) |")
    print("|---|---|---|---|---|---|---|")
    for name, variant, ips, tflops, mfu, params, gflop in rows:
        print(f"| {name} | {variant} | {ips:.1f} | {tflops:.3f} | {mfu} | {params:.1f} | {gflop:.2f} |")


def _caption_rows(args, device, dtype, sync, gen) -> list[tuple]:
    """CapPa against the contrastive CLIP of each ``--clip-models`` size, interleaved rounds, the table's rows."""
    import torch

    from vitscale.models import create_model
    from vitscale.models.flops import forward_flops
    from vitscale.models.losses import create_loss
    from vitscale.models.noise import sample_keys
    from vitscale.train.captioning import parallel_share

    rows = []
    decoder = dict(layers=args.decoder_layers, width=args.decoder_width, heads=args.decoder_heads)
    for name in args.clip_models:
        vision = dict(image_size=args.img)
        with torch.device("meta"):
            text = create_model(name, vision=vision).cfg.text
        images = [torch.randint(0, 256, (args.batch, 3, args.img, args.img), dtype=torch.uint8, generator=gen)
                  for _ in range(4)]
        tokens = [torch.randint(1, text.vocab_size, (args.batch, text.context_length), generator=gen) for _ in range(4)]
        parallel = parallel_share(sample_keys(0, torch.arange(args.batch)), 0.75).to(device)
        clip_loss, caption_loss = create_loss("clip"), create_loss("captioning")
        runs = {}
        for variant, model_name, options in (("clip", name, {}),
                                             ("cappa", "cappa_" + name.removeprefix("clip_"), dict(decoder=decoder))):
            torch.manual_seed(0)
            model = create_model(model_name, vision=vision, **options).to(device)
            inputs = [((x.to(device).to(dtype) / 127.5 - 1.0), t.to(device)) for x, t in zip(images, tokens)]
            runs[variant] = dict(model=model, opt=torch.optim.AdamW(model.parameters(), lr=1e-4), inputs=inputs,
                                 flops=forward_flops(model.cfg) * args.batch, times=[])

        def step(variant, run, i):
            x, t = run["inputs"][i % len(run["inputs"])]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                if variant == "clip":
                    image, text_features, scale = run["model"](x, t)
                    loss = clip_loss(image.float(), text_features.float(), scale.float())
                else:
                    loss = caption_loss(run["model"](x, t, parallel), t).mean()
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)

        for variant, run in runs.items():
            step(variant, run, 0)
        for _ in range(args.rounds):
            for variant, run in runs.items():
                sync()
                start = time.perf_counter()
                for i in range(args.steps):
                    step(variant, run, i)
                sync()
                run["times"].append((time.perf_counter() - start) / args.steps)
        for variant, run in runs.items():
            step_s = statistics.median(run["times"])
            tflops = 3 * run["flops"] / step_s / 1e12
            mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "n/a"
            rows.append((name, variant, args.batch / step_s, tflops, mfu,
                         sum(p.numel() for p in run["model"].parameters()) / 1e6, 3 * run["flops"] / args.batch / 1e9))
    return rows


if __name__ == "__main__":
    main()
