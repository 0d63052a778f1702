"""Images/s per CPU core of every synthetic generator, next to a plain NumPy/PIL
implementation of the same algorithm (benchmarks/synth_reference/), measured in the same
run: one thread, after JIT warm-up, the two sides interleaved over several rounds,
medians reported (timings here swing about 10% between back-to-back runs).

Per core means per CPU-second of the rendering thread: each side is timed with
``time.thread_time()``, the CPU time of this thread alone, so the rate is images per
second of one core even on a machine shared with other jobs, where wall-clock rates
under-report by the share of the core the others take. The wall-clock rate of the same
images is the table's last column.

    python benchmarks/synth_speed.py [--size 224] [--rounds 3] [--seconds 2] [GENERATOR ...]

"ours + png + tar" is what ``vitscale-synth`` does per image: render, PNG-encode,
write the image, class and parameter JSON into a tar.

    python benchmarks/synth_speed.py --formats [--images 512] [--size 224] [--rounds 3] [GENERATOR]

measures instead the shard formats end to end, png against npy (``vitscale-synth --format``):
writing a dataset with vitscale's own writer (render, encode, tar; one process) and reading it
back through the shard loader (tar, decode, batches; no augmentation, one process), in
images/s per core, and the bytes per image on disk; the formats interleaved over the rounds.

    python benchmarks/synth_speed.py --device cuda|cpu [--batch 256] [--size 224] [--rounds 3] [GENERATOR ...]

times the device renderers (``render_batch``, ``data.render=device``) beside the numba renderer of the
loader workers, interleaved over the rounds: on cuda images/s per device (wall clock, synchronised)
against numba's images/s per core; on cpu both per core (CPU time of the one thread, ``time.thread_time``).
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


def _rate(fn, seconds: float, start: int) -> tuple[float, float, int]:
    """Images per CPU-second of this thread (the per-core rate) and per wall-clock second of
    ``fn(label, instance)``, over at least ``seconds`` of thread CPU time and 2 images.

    Returns:
        ``(per-core rate, wall-clock rate, the next image's position)``.
    """
    n, t0, w0 = 0, time.thread_time(), time.perf_counter()
    while True:
        fn((start + n) % LABELS, (start + n) // LABELS + 1)
        n += 1
        elapsed = time.thread_time() - t0
        if elapsed >= seconds and n >= 2:
            return n / elapsed, n / (time.perf_counter() - w0), start + n


def formats(name: str, images: int, size: int, rounds: int) -> None:
    """png against npy shards, written and read back end to end (see the module docstring)."""
    import shutil
    import tempfile
    from functools import partial

    from vitscale.data import shards as sh
    from vitscale.data.synthetic_loader import build_shard_loader

    classes = 16
    instances = max(1, images // classes)
    total, batch = classes * instances, 16
    root = Path(tempfile.mkdtemp(prefix="synth_formats_"))
    rates: dict[str, dict[str, list[float]]] = {f: {"write": [], "read": []} for f in ("png", "npy")}
    sizes = {}
    try:
        create_generator(name, classes, size, seed=0).render(0, 0)  # JIT compilation outside the timings
        for r in range(rounds):
            for fmt in ("png", "npy"):
                spec = sh.DatasetSpec(name, classes, instances, 0, size, fmt, shard_size=256)
                out = root / f"{fmt}{r}"
                build = partial(create_generator, name, classes, size, 0)
                t0 = time.perf_counter()
                sh.prepare_out_dir(spec, out)
                sh.write_shards(build, spec, out, sh.claim_shards(spec, out), 1)
                sh.finish_dataset(spec, out)
                rates[fmt]["write"].append(total / (time.perf_counter() - t0))
                sizes[fmt] = sum(p.stat().st_size for p in out.glob(sh.SHARD_GLOB)) / total
                loader = build_shard_loader(out, size, seed=0, micro_batch=batch, global_batch=batch, data_rank=0,
                                            data_world=1, num_workers=0, shuffle_buffer=64, augment=False)
                it = iter(loader)
                next(it)  # the first batch opens the shards
                t0 = time.perf_counter()
                for _ in range(total // batch):
                    next(it)
                rates[fmt]["read"].append(total // batch * batch / (time.perf_counter() - t0))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {f: {k: statistics.median(v) for k, v in d.items()} for f, d in rates.items()}
    print(f"\n{name}, {size} px, {total} images, 1 process, medians of {rounds} interleaved rounds\n")
    print("| shards | write (render + encode + tar), img/s | read (tar + decode + batch), img/s | bytes per image |")
    print("| --- | --- | --- | --- |")
    for fmt in ("png", "npy"):
        print(f"| {fmt} | {med[fmt]['write']:.0f} | {med[fmt]['read']:.0f} | {sizes[fmt]:.0f} |")
    print(f"npy/png: write {med['npy']['write'] / med['png']['write']:.2f}x, "
          f"read {med['npy']['read'] / med['png']['read']:.2f}x, size {sizes['npy'] / sizes['png']:.2f}x")


def device_rates(names: list[str], device: str, batch: int, size: int, rounds: int, seconds: float) -> None:
    """``render_batch`` on ``device`` against the numba ``render``, per generator (module docstring)."""
    import torch

    dev = torch.device(device)
    clock = time.perf_counter if dev.type == "cuda" else time.thread_time  # cpu: CPU time of this (the only) thread
    torch.set_num_threads(1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rows = []
    for name in names:
        gen = create_generator(name, CLASSES, size, seed=0)
        if not hasattr(gen, "render_batch"):
            print(f"{name}: no render_batch (stays on the workers)", file=sys.stderr)
            continue
        labels = torch.arange(batch) % LABELS
        gen.render_batch(labels[:2], torch.zeros(2, dtype=torch.long), dev)  # warm-up, category set-up
        for label in range(LABELS):
            gen.render(label, 0)
        rates: dict[str, list[float]] = {"device": [], "numba": []}
        start = {"device": 1, "numba": 1}
        for _ in range(rounds):
            n, t0 = 0, clock()
            while True:  # whole batches, at least one
                sync()
                gen.render_batch(labels, torch.full((batch,), start["device"], dtype=torch.long), dev)
                sync()
                start["device"] += 1
                n += batch
                if clock() - t0 >= seconds:
                    break
            rates["device"].append(n / (clock() - t0))
            n, t0 = 0, time.thread_time()
            while True:
                gen.render(n % LABELS, start["numba"] + n // LABELS)
                n += 1
                if time.thread_time() - t0 >= seconds and n >= 2:
                    break
            start["numba"] += n // LABELS + 1
            rates["numba"].append(n / (time.thread_time() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append((name, med["device"], med["numba"]))
        print(f"{name}: render_batch {med['device']:.1f}, numba {med['numba']:.1f} images/s", file=sys.stderr, flush=True)
    unit = f"img/s per {'device' if dev.type == 'cuda' else 'core'}"
    print(f"\n{size} px, render_batch at batch {batch} on {device}, medians of {rounds} interleaved rounds\n")
    print(f"| generator | render_batch on {device} ({unit}) | numba render (img/s per core) | ratio |")
    print("| --- | --- | --- | --- |")
    for name, d, c in rows:
        print(f"| {name} | {d:.0f} | {c:.0f} | {d / c:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("generators", nargs="*", help="default: every generator with a reference")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="per side, per round")
    ap.add_argument("--formats", action="store_true", help="png against npy shards, end to end (one generator)")
    ap.add_argument("--images", type=int, default=512, help="with --formats: images per round")
    ap.add_argument("--device", help="cuda or cpu: time render_batch (data.render=device) beside the numba renderer")
    ap.add_argument("--batch", type=int, default=256, help="with --device: images per render_batch call")
    args = ap.parse_args(argv)
    if args.device:
        device_rates(args.generators or ["fractal", "exfractal", "rcdb", "visual_atom", "perlin"], args.device,
                     args.batch, args.size, args.rounds, args.seconds)
        return
    if args.formats:
        formats((args.generators or ["fractal"])[0], args.images, args.size, args.rounds)
        return
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
        rates: dict[str, list[float]] = {"ours": [], "shard": [], "plain": [], "ours_wall": []}
        pos = {k: 0 for k in ("ours", "shard", "plain")}
        for _ in range(args.rounds):
            for key, fn in (("ours", ours), ("shard", shard), ("plain", plain)):
                rate, wall, pos[key] = _rate(fn, args.seconds, pos[key])
                rates[key].append(rate)
                if key == "ours":
                    rates["ours_wall"].append(wall)
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append((name, med["ours"], med["shard"], med["plain"], med["ours_wall"]))
        print(f"{name}: ours {med['ours']:.1f}, ours + png + tar {med['shard']:.1f}, plain {med['plain']:.2f} "
              f"images per CPU-second; ours {med['ours_wall']:.1f} per wall-clock second", file=sys.stderr, flush=True)

    print(f"\n{args.size} px, 1 thread, images per CPU-second of the thread (time.thread_time), "
          f"medians of {args.rounds} interleaved rounds\n")
    print("| generator | ours (img/s/core) | ours + png + tar | plain NumPy/PIL | ratio (ours / plain) "
          "| ours, wall-clock img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, ours_r, shard_r, plain_r, wall_r in rows:
        print(f"| {name} | {ours_r:.0f} | {shard_r:.0f} | {plain_r:.2f} | {ours_r / plain_r:.1f}x | {wall_r:.0f} |")


if __name__ == "__main__":
    main()
