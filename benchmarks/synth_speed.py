"""Images/s per CPU core of every synthetic generator, next to a plain NumPy/PIL
implementation of the same algorithm (benchmarks/synth_reference/), measured in the same
run: one thread, after JIT warm-up, the two sides interleaved over several rounds,
medians reported (timings here swing about 10% between back-to-back runs).

    python benchmarks/synth_speed.py [--size 224] [--rounds 3] [--seconds 2] [GENERATOR ...]

"ours + png + tar" is what ``vitscale-synth`` does per image: render, PNG-encode,
write the image, class and parameter JSON into a tar.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vitscale.data.shards import encode_image, to_json  # noqa: E402
from vitscale.data.synthetic import create_generator, list_generators  # noqa: E402

CLASSES = 1000  # category parameters are drawn per label: a large set costs nothing up front
LABELS = 16  # images cycle over this many classes


def _rate(fn, seconds: float, start: int) -> tuple[float, int]:
    """Images/s of ``fn(label, instance)`` over at least ``seconds`` (and at least 2 images)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn((start + n) % LABELS, (start + n) // LABELS + 1)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 2:
            return n / elapsed, start + n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("generators", nargs="*", help="default: every generator with a reference")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="per side, per round")
    args = ap.parse_args(argv)
    refs = sorted(p.stem for p in (Path(__file__).parent / "synth_reference").glob("*.py") if p.stem != "__init__")
    names = args.generators or [g for g in list_generators() if g in refs]

    rows = []
    for name in names:
        gen = create_generator(name, CLASSES, args.size, seed=0)
        ref = importlib.import_module(f"synth_reference.{name}")

        def ours(label, instance, gen=gen):
            return gen.render(label, instance)

        def shard(label, instance, gen=gen, tar=tarfile.open(fileobj=io.BytesIO(), mode="w")):
            for suffix, data in (("png", encode_image(gen.render(label, instance), "png")), ("cls", str(label).encode()),
                                 ("json", to_json(gen.params(label, instance)).encode())):
                info = tarfile.TarInfo(f"{label:06d}_{instance:07d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        def plain(label, instance, ref=ref):
            return ref.render(label, instance, args.size, 0)

        for label in range(LABELS):  # JIT compilation and per-class set-up stay out of the timings
            ours(label, 0), shard(label, 0)
        plain(0, 0)
        rates: dict[str, list[float]] = {"ours": [], "shard": [], "plain": []}
        pos = {k: 0 for k in rates}
        for _ in range(args.rounds):
            for key, fn in (("ours", ours), ("shard", shard), ("plain", plain)):
                rate, pos[key] = _rate(fn, args.seconds, pos[key])
                rates[key].append(rate)
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append((name, med["ours"], med["shard"], med["plain"]))
        print(f"{name}: ours {med['ours']:.1f}, ours + png + tar {med['shard']:.1f}, plain {med['plain']:.2f} "
              f"images/s", file=sys.stderr, flush=True)

    print(f"\n{args.size} px, 1 thread, medians of {args.rounds} interleaved rounds\n")
    print("| generator | ours (img/s/core) | ours + png + tar | plain NumPy/PIL | ratio (ours / plain) |")
    print("| --- | --- | --- | --- | --- |")
    for name, ours_r, shard_r, plain_r in rows:
        print(f"| {name} | {ours_r:.0f} | {shard_r:.0f} | {plain_r:.2f} | {ours_r / plain_r:.1f}x |")


if __name__ == "__main__":
    main()
