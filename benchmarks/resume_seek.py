"""Exact resume of the image-text loader: time to the first batch after a resume at 10% and at 90%
of an epoch (issue 19: a resume seeks to its place instead of replaying the epoch so far).

    python benchmarks/resume_seek.py [--samples 20000] [--shard-size 500] [--size 64] [--rounds 7]

Writes a shard set in img2dataset's format (``vitscale-synth laion-sample``), takes the loader's
checkpoint state after 10% and after 90% of an exact epoch (one data rank, one worker, the
default 1000-sample shuffle blocks), then, interleaved over ``--rounds`` rounds (medians), times
a resume from each state to its first batch, as a new process does it (the shards' sample
indexes are read from their cached JSON, not from this process's memory). For comparison it
times what the earlier loader did before its first batch: reading the raw stream from the
epoch's start to the saved position (tar reads and filters, no decoding: a lower bound of its
replay).

The goal: the 90% resume within 2x of the 10% one (a replay grows linearly with the position).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="samples in the epoch")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--micro-batch", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from vitscale.data import tar_index
    from vitscale.data.captions import CaptionTokenizer
    from vitscale.data.laion import LaionLoader, LaionStream, SampleFilter, resolve_sources
    from vitscale.data.laion_sample import write_laion_sample

    tokenizer = CaptionTokenizer(vocab_size=1000, context_length=16)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        classes = 10
        write_laion_sample(tmp, classes=classes, instances=args.samples // classes, val_instances=1, size=args.size,
                           shard_size=args.shard_size)
        sources = resolve_sources(tmp)
        total = sum(s.num_samples for s in sources)
        print(f"{total} samples in {len(sources[0].urls)} shards of {args.shard_size} ({args.size} px JPEGs), "
              f"written in {time.perf_counter() - t0:.1f} s")

        def stream(state=None):
            return LaionStream(sources, tokenizer, args.micro_batch, 0, 1, args.size, seed=0, resampled=False,
                               shuffle_buffer=1000, workers=1, state=state)

        batches = stream().rank_batches
        states = {}
        loader = LaionLoader(stream(), 0)
        it = iter(loader)
        for done in range(1, batches):
            next(it)
            for frac in (0.1, 0.9):
                if done == round(frac * batches):
                    states[frac] = json.loads(json.dumps(loader.state_dict()))  # as through a checkpoint
        taken = {f: s["positions"]["0"]["taken"] for f, s in states.items()}

        def resume(frac: float) -> float:
            tar_index._memory.clear()  # as a new process: indexes come from their cached JSON
            start = time.perf_counter()
            next(iter(LaionLoader(stream(states[frac]), 0)))
            return time.perf_counter() - start

        def replay(frac: float) -> float:
            """The earlier resume's reads: the raw stream from the epoch's start to the position."""
            s = stream()
            counts, keep = collections.Counter(), SampleFilter({})
            start = time.perf_counter()
            kept = 0
            for _, sample in s._raw(0, 0, counts):
                kept += s._keep(sample, keep, counts) is not None
                if kept >= taken[frac]:
                    break
            return time.perf_counter() - start

        resume(0.1), resume(0.9)  # warm-up: page cache, indexes built and cached
        times: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(args.rounds):
            for frac in (0.1, 0.9):
                times[f"resume {frac:.0%}"].append(resume(frac))
                times[f"replay {frac:.0%}"].append(replay(frac))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"median of {args.rounds} interleaved rounds, one data rank, one worker, micro-batch {args.micro_batch}:")
        for frac in (0.1, 0.9):
            print(f"  at {frac:.0%} of the epoch (sample {taken[frac]}): resume to first batch "
                  f"{med[f'resume {frac:.0%}'] * 1e3:8.1f} ms   (replaying the epoch so far: "
                  f"{med[f'replay {frac:.0%}'] * 1e3:8.1f} ms)")
        ratio = med["resume 90%"] / med["resume 10%"]
        print(f"resume at 90% / resume at 10%: {ratio:.2f}x (goal: within 2x); "
              f"replay at 90% / 10%: {med['replay 90%'] / med['replay 10%']:.2f}x")
        for frac in (0.1, 0.9):
            print(f"  {frac:.0%}: " + " ".join(f"{t * 1e3:.1f}" for t in times[f"resume {frac:.0%}"]) + " ms")


if __name__ == "__main__":
    main()
