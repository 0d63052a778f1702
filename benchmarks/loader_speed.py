"""Image-text loader speed per core against the raw JPEG decode rate of the same images (the ceiling).

    python benchmarks/loader_speed.py [--samples 2000] [--size 256] [--rounds 5]

Writes a shard set in img2dataset's format (``vitscale-synth laion-sample``, Perlin-noise
images: textures that compress like photos) and measures, on one core, interleaved over
``--rounds`` rounds after a warm-up round (medians; timings swing ~10% between back-to-back runs
here):

- decoders alone on the JPEG bytes held in memory: simplejpeg, PIL, torchvision.io (how
  ``vitscale.data.laion`` chose simplejpeg);
- **loader**: ``LaionStream`` end to end (tar read, json, filters, shuffle buffer, decode,
  canvas, crop box; then with OpenAI BPE tokens, ``data/clip_bpe.py``) -> samples/s, and its
  ratio to the simplejpeg ceiling;
- the tokenizers alone on captions: ours (HF ``tokenizers``, open_clip's ids) and open_clip's;
- the device-side crop + resize + normalise of those batches (``crop_resize``) on this CPU
  (on a GPU it is one kernel per batch);
- for comparison, open_clip's per-sample CPU pipeline (PIL decode, RandomResizedCrop,
  ToTensor, Normalize), as its webdataset loader runs it in each worker.

The last line, ``loader/decode ratio R (images), R2 (images + tokens)``, is what the speed
acceptance reads (both >= 0.8).
"""
from __future__ import annotations

import argparse
import collections
import io
import itertools
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _jpegs(folder: Path) -> list[bytes]:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            out += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]
    return out


def _rate(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="stored image side (img2dataset's default resize)")
    ap.add_argument("--image-size", type=int, default=224, help="model input side")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import simplejpeg
    from PIL import Image
    from torchvision.io import decode_jpeg

    from vitscale.data.captions import CaptionTokenizer
    from vitscale.data.laion import LaionStream, Position, resolve_sources
    from vitscale.data.laion_sample import write_laion_sample
    from vitscale.data.transforms import crop_resize, normalize

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        classes = 10
        write_laion_sample(folder, "perlin", classes, max(1, args.samples // classes), 1, args.size, 500)
        jpegs = _jpegs(folder)
        sources = resolve_sources(str(folder))  # a folder: its *.tar
        tokenizer = CaptionTokenizer()  # OpenAI BPE, context 77 (HF tokenizers, open_clip's ids)
        batch = 64
        def stream_with(tok):
            return LaionStream(sources, tok, batch, 0, 1, args.size, seed=0, resampled=False, shuffle_buffer=1000,
                               train=True)

        stream = stream_with(tokenizer)
        # The image path alone (what the ceiling compares with): captions read, not tokenised.
        images_only = stream_with(lambda captions: torch.zeros(len(captions), 77, dtype=torch.long))
        n_batches = stream.rank_batches
        captions = [f"a photo of sample {i} with a caption of about ten words" for i in range(len(jpegs))]
        tokenizer(["warm up the BPE"])

        import open_clip

        open_clip_tokenizer = open_clip.tokenizer.SimpleTokenizer()

        oc_transform = open_clip.image_transform(args.image_size, is_train=True)
        mean, std = torch.tensor([0.481, 0.458, 0.408]), torch.tensor([0.269, 0.261, 0.276])

        def loader_rate(stream) -> float:
            start = time.perf_counter()
            count = 0
            for _ in stream._epoch(0, 0, Position(), collections.Counter()):  # each batch dropped, as in training
                count += 1
            return count * batch / (time.perf_counter() - start)

        # Four batches for the device-side measurement, made once and outside the timed loader runs: a
        # consumer holding batches keeps the loader from reusing their arrays (laion.BatchBuffers).
        batches = [(images, boxes) for images, _, boxes, _ in
                   itertools.islice(stream_with(tokenizer)._epoch(0, 0, Position(), collections.Counter()), 4)]

        def device_rate(batches) -> float:
            start = time.perf_counter()
            for images, boxes in batches:
                normalize(crop_resize(images.permute(0, 3, 1, 2), boxes, args.image_size), mean, std)
            return len(batches) * batch / (time.perf_counter() - start)

        def open_clip_one(data: bytes):
            return oc_transform(Image.open(io.BytesIO(data)).convert("RGB"))

        results: dict[str, list[float]] = {k: [] for k in (
            "simplejpeg", "PIL", "torchvision.io", "loader, images (decode + crop box + canvas)",
            "loader, images + OpenAI BPE tokens", "our BPE tokenizer alone (HF tokenizers)", "open_clip tokenizer alone",
            "device crop+resize+normalise (this CPU)",
            "open_clip per-sample transform")}
        # One more round than asked, the first one a warm-up left out: it pays what a worker pays once
        # (its batch arrays' first pages, the tokenizer's word cache, the shards into the page cache).
        for _ in range(args.rounds + 1):
            results["simplejpeg"].append(_rate(lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"), jpegs))
            results["PIL"].append(_rate(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), jpegs))
            results["torchvision.io"].append(_rate(
                lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)), jpegs))
            results["loader, images (decode + crop box + canvas)"].append(loader_rate(images_only))
            results["loader, images + OpenAI BPE tokens"].append(loader_rate(stream))
            for name, tok in (("our BPE tokenizer alone (HF tokenizers)", tokenizer),
                              ("open_clip tokenizer alone", open_clip_tokenizer)):
                start = time.perf_counter()
                for i in range(0, len(captions), batch):
                    tok(captions[i:i + batch])
                results[name].append(len(captions) / (time.perf_counter() - start))
            results["device crop+resize+normalise (this CPU)"].append(device_rate(batches))
            results["open_clip per-sample transform"].append(_rate(open_clip_one, jpegs[:len(jpegs) // 2]))
        med = {k: statistics.median(v[1:]) for k, v in results.items()}
        print(f"{len(jpegs)} JPEGs of {args.size} px (Perlin noise, quality 95), {n_batches} batches of {batch}; "
              f"one core; medians of {args.rounds} interleaved rounds after a warm-up round")
        print("| pipeline | samples/s per core | vs simplejpeg decode |")
        print("|---|---:|---:|")
        for k, v in med.items():
            print(f"| {k} | {v:,.0f} | {v / med['simplejpeg']:.2f} |")
        images = med["loader, images (decode + crop box + canvas)"] / med["simplejpeg"]
        tokens = med["loader, images + OpenAI BPE tokens"] / med["simplejpeg"]
        print(f"loader/decode ratio {images:.2f} (images), {tokens:.2f} (images + tokens)")


if __name__ == "__main__":
    main()
