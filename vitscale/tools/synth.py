"""``vitscale-synth``: write, search, preview and list synthetic datasets.

    vitscale-synth GENERATOR --classes N --instances M --size S --out DIR
                   [--shard-size K] [--workers W] [--seed S] [--format png|jpg|npy]
                   [--param key=value ...] [--categories FILE]
    vitscale-synth search GENERATOR --classes N --out FILE [--seed S] [--size S] [--param ...]
    vitscale-synth preview GENERATOR --out grid.png [--classes C] [--instances I] [--size S] ...
    vitscale-synth list
    vitscale-synth laion-sample --out DIR [--generator G] [--classes N] [--instances M] [--size S] ...

Writing splits over launcher ranks and local processes: rank ``r`` of ``R`` (from the
environment, so ``mpirun -np 64 vitscale-synth ...``, ``srun`` and ``torchrun`` work without
mpi4py) writes the shards ``s`` with ``s % R == r``, each with ``--workers`` processes that
render whole shards. Rerunning the same command resumes: complete shards are kept, a
shard cut off mid-way is rewritten. The layout is described in ``vitscale.data.shards``.

Rank 0's progress bar (stderr; where it is a terminal, or ``--progress``) counts every rank's
images: its own as they are rendered, the other ranks' shards as they appear complete in the
folder (one listing of it at most every ``POLL_S``: no messages between ranks). Once its own
shards are written it waits for the others' while they keep appearing, so the bar ends at the
total; only the bar waits (``--no-progress``, or no terminal: rank 0 ends with its own shards).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from vitscale.data import shards as sh
from vitscale.distributed import rank_from_env, world_size_from_env
from vitscale.data.synthetic import create_generator, list_generators
from vitscale.progress import add_progress_flags, progress_bar, wanted

logger = logging.getLogger("vitscale.synth")

COMMON_ARGS = ("num_classes", "image_size", "seed", "categories")
POLL_S = 1.0  # rank 0 lists the dataset folder at most this often for other ranks' finished shards
STALL_S = 60.0  # after its own shards, rank 0's bar waits this long (or 3 shard times) for another shard


class UsageError(Exception):
    """A mistake on the command line: reported as one line, without a traceback."""


def launcher_rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks, from whichever launcher started it
    (``vitscale.distributed`` reads the environment; no process group is started)."""
    try:
        return rank_from_env(), world_size_from_env()
    except ImportError:  # PMIx without a size variable needs mpi4py to ask MPI
        raise UsageError("this MPI launcher exports no world size and mpi4py is not installed: "
                         "pip install mpi4py, or launch with mpirun/srun") from None


def _parse_params(items: list[list[str]] | None) -> dict:
    params = {}
    for item in [x for group in items or [] for x in group]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r} is not key=value (e.g. --param points=100000)")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--param {item!r}: the value is not valid YAML ({e})") from None
    return params


def _build(name: str, classes: int, size: int, seed: int, params: dict, categories: list | None = None):
    """``create_generator`` with a message that says which argument to change."""
    extra = {"categories": categories} if categories is not None else {}
    try:
        return create_generator(name, classes, size, seed, **params, **extra)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise UsageError(f"generator '{name}' does not take --param {', '.join(sorted(params))} ({e})") from None


def _resolved_params(generator, params: dict) -> dict:
    """The generator's constructor arguments with defaults filled in: two runs that differ
    only in spelling a default out must be recognised as the same dataset."""
    sig = inspect.signature(type(generator).__init__)
    resolved = {k: p.default for k, p in sig.parameters.items()
                if k not in ("self", *COMMON_ARGS) and p.default is not inspect.Parameter.empty}
    resolved.update(params)
    return resolved


def _json_kwargs(kwargs: dict) -> dict:
    try:
        return json.loads(sh.to_json(kwargs))
    except TypeError as e:
        raise UsageError(f"generator parameters must be JSON-serialisable to be recorded in "
                         f"{sh.DATASET_FILE}: {e}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("generator", help="registered generator name (vitscale-synth list)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: every image depends on it (default 0)")
    p.add_argument("--param", action="append", nargs="+", metavar="KEY=VALUE",
                   help="generator constructor argument, value parsed as YAML; repeatable")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    prog = "vitscale-synth"
    write = argparse.ArgumentParser(prog=prog, description="Write a synthetic dataset as WebDataset tar shards. "
                                    f"Other commands: {prog} search|preview|list --help.")
    _common(write)
    write.add_argument("--classes", type=int, required=True, help="number of classes")
    write.add_argument("--instances", type=int, required=True, help="images per class")
    write.add_argument("--size", type=int, required=True, help="image side length, pixels")
    write.add_argument("--out", type=Path, required=True, help="dataset folder (created; a rerun resumes)")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    write.add_argument("--workers", type=int, default=1, help="local processes per rank (default 1)")
    write.add_argument("--format", choices=("png", "jpg", "npy"), default="png",
                       help="png: lossless (default); jpg: quality 95, ~3x smaller for noisy images; npy: the "
                            "uint8 arrays as they are (no encode or decode; larger; for shards only vitscale reads)")
    write.add_argument("--categories", type=Path, help="category file from 'vitscale-synth search' "
                       "(generators with a category search)")
    add_progress_flags(write)

    search = argparse.ArgumentParser(prog=f"{prog} search", description="Run a generator's category search "
                                     "and save the categories for --categories.")
    _common(search)
    search.add_argument("--classes", type=int, required=True, help="number of categories to find")
    search.add_argument("--size", type=int, default=224, help="image size the search renders at (default 224)")
    search.add_argument("--out", type=Path, required=True, help="categories file (JSON)")

    preview = argparse.ArgumentParser(prog=f"{prog} preview", description="A PNG grid: one row per class, "
                                      "one column per instance.")
    _common(preview)
    preview.add_argument("--out", type=Path, required=True, help="PNG file")
    preview.add_argument("--classes", type=int, default=8, help="rows (default 8)")
    preview.add_argument("--num-classes", type=int, help="classes of the dataset the rows are taken from, "
                         "evenly spaced (default: --classes)")
    preview.add_argument("--instances", type=int, default=8, help="columns (default 8)")
    preview.add_argument("--size", type=int, default=96, help="image size, pixels (default 96)")
    preview.add_argument("--categories", type=Path, help="category file from 'vitscale-synth search'")

    listing = argparse.ArgumentParser(prog=f"{prog} list", description="Registered generators.")

    laion = argparse.ArgumentParser(prog=f"{prog} laion-sample", description="A small image-caption shard set in "
                                    "img2dataset's format (tar + parquet + _stats.json per shard, val/ held out, "
                                    "classnames.txt) from synthetic images captioned with their class.")
    laion.add_argument("--out", type=Path, required=True, help="folder (train shards; val/ beside them)")
    laion.add_argument("--generator", default="gratings", help="synthetic generator (default gratings)")
    laion.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    laion.add_argument("--instances", type=int, default=64, help="training rows per class (default 64)")
    laion.add_argument("--val-instances", type=int, default=16, help="held-out rows per class (default 16)")
    laion.add_argument("--size", type=int, default=64, help="image side, pixels (default 64)")
    laion.add_argument("--shard-size", type=int, default=80, help="rows per shard (default 80)")
    laion.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    return {"write": write, "search": search, "preview": preview, "list": listing, "laion-sample": laion}


def _cmd_laion_sample(args) -> None:
    from vitscale.data.laion_sample import write_laion_sample

    _positive(classes=args.classes, instances=args.instances, val_instances=args.val_instances, size=args.size,
              shard_size=args.shard_size)
    if args.generator not in list_generators():
        raise UsageError(f"--generator {args.generator} is not registered; choose from {', '.join(list_generators())}")
    done = write_laion_sample(args.out, args.generator, args.classes, args.instances, args.val_instances, args.size,
                              args.shard_size, args.seed)
    logger.info("%d image-caption pairs in %d shards -> %s; %d held out in %d shards -> %s", done["train"],
                done["shards"], args.out, done["val"], done["val_shards"], args.out / "val")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value} must be at least 1")


def _cmd_list(args) -> None:
    sys.stdout.write("".join(f"{name}\n" for name in list_generators()))


def _cmd_search(args) -> None:
    _positive(classes=args.classes, size=args.size)
    params = _parse_params(args.param)
    start = time.perf_counter()
    generator = _build(args.generator, args.classes, args.size, args.seed, params)
    if not callable(getattr(generator, "categories", None)):
        raise UsageError(f"generator '{args.generator}' has no category search (no categories() method); "
                         "its classes are defined by formula, so it needs no categories file")
    categories = generator.categories()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sh.save_categories(args.out, categories, generator=args.generator, classes=args.classes, seed=args.seed,
                       image_size=args.size, generator_kwargs=_resolved_params(generator, params))
    logger.info("found %d categories of %s in %.1f s -> %s", len(categories), args.generator,
                time.perf_counter() - start, args.out)


def _cmd_preview(args) -> None:
    num_classes = args.num_classes or args.classes
    _positive(classes=args.classes, num_classes=num_classes, instances=args.instances, size=args.size)
    if args.classes > num_classes:
        raise UsageError(f"--classes={args.classes} rows cannot come from --num-classes={num_classes} classes")
    categories = (sh.load_categories(args.categories, args.generator, num_classes)
                  if args.categories else None)
    generator = _build(args.generator, num_classes, args.size, args.seed, _parse_params(args.param), categories)
    labels = np.linspace(0, num_classes - 1, args.classes).round().astype(int)
    rows = [np.concatenate([generator.render(int(label), i) for i in range(args.instances)], axis=1)
            for label in labels]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out)  # (classes * S, instances * S, 3)
    logger.info("classes %s x instances 0..%d -> %s", labels.tolist(), args.instances - 1, args.out)


def _cmd_write(args) -> None:
    _positive(classes=args.classes, instances=args.instances, size=args.size, shard_size=args.shard_size,
              workers=args.workers)
    rank, world = launcher_rank_world()
    params, out = _parse_params(args.param), args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    # Cheap check before a possibly long category search: same generator, shape and seed.
    sh.check_arguments({"generator": args.generator, "classes": args.classes, "instances": args.instances,
                        "seed": args.seed, "image_size": args.size, "format": args.format,
                        "shard_size": args.shard_size}, out)

    categories = None
    if args.categories:
        categories = sh.load_categories(args.categories, args.generator, args.classes)
    elif (out / sh.CATEGORIES_FILE).exists():  # a rerun: reuse the search of the first run
        categories = sh.load_categories(out / sh.CATEGORIES_FILE, args.generator, args.classes)
    generator = _build(args.generator, args.classes, args.size, args.seed, params, categories)
    kwargs = _json_kwargs(_resolved_params(generator, params))
    if categories is None and callable(getattr(generator, "categories", None)):
        categories = generator.categories()
    if categories is not None:
        categories = json.loads(sh.to_json(categories))  # the form every later run reads back
        out.mkdir(parents=True, exist_ok=True)
        sh.check_arguments({"generator_kwargs": kwargs}, out)
        published = sh.publish_categories(out, categories, generator=args.generator, classes=args.classes,
                                          seed=args.seed, image_size=args.size, generator_kwargs=kwargs)
        if published != categories and args.categories:
            raise UsageError(f"{out / sh.CATEGORIES_FILE} holds other categories than {args.categories}; "
                             "use a new --out folder")
        if published != categories:
            # Another rank's search landed first with a different result (a search that is not the
            # pure function it should be): follow the file, so that all shards agree.
            logger.warning("rank %d: this rank's category search differs from %s; using the file", rank,
                           out / sh.CATEGORIES_FILE)
            categories = published
            generator = _build(args.generator, args.classes, args.size, args.seed, params, categories)

    spec = sh.DatasetSpec(args.generator, args.classes, args.instances, args.seed, args.size, args.format,
                          args.shard_size, kwargs, sh.categories_sha256(categories) if categories is not None else None)
    sh.prepare_out_dir(spec, out)
    todo = sh.claim_shards(spec, out, rank, world)
    images = sum(len(spec.shard_indices(s)) for s in todo)
    show = rank == 0 and wanted(args.progress)
    tracker = AllRanksProgress(spec, out, todo) if show and world > 1 else None
    everyone = f"; all ranks: {len(tracker.pending)} shards, {tracker.total} images to write" if tracker else ""
    logger.info("rank %d/%d: %d of %d shards to write (%d images, %d worker(s)) -> %s%s", rank, world,
                len(todo), len(range(rank, spec.num_shards, world)), images, args.workers, out, everyone)
    build = functools.partial(create_generator, args.generator, args.classes, args.size, args.seed, **params,
                              **({"categories": categories} if categories is not None else {}))
    if todo:
        generator.render(0, 0)  # compile the kernels once here: forked workers inherit them

    start = time.perf_counter()
    desc = f"{args.generator} all {world} ranks" if tracker else f"{args.generator} rank {rank}/{world}"
    with progress_bar(tracker.total if tracker else images, desc, "img", show) as bar:
        if tracker is not None:
            tracker.bar = bar
        sh.write_shards(build, spec, out, todo, args.workers, progress=tracker.update if tracker else bar.update)
        elapsed = time.perf_counter() - start  # this rank's own writing
        if tracker is not None:
            tracker.wait_for_others(max(STALL_S, 3 * elapsed / max(1, len(todo))))
    if todo:
        logger.info("rank %d: %d images in %.1f s (%.1f images/s)", rank, images, elapsed, images / elapsed)
    if sh.finish_dataset(spec, out):
        logger.info("dataset complete: %d shards, %d samples, %s", spec.num_shards, spec.num_samples,
                    out / sh.DATASET_FILE)
    else:
        logger.info("rank %d done; %s appears when every rank has written its shards", rank, sh.DATASET_FILE)


class AllRanksProgress:
    """Rank 0's count of every rank's images: its own from the writer's callback, the other ranks'
    a shard at a time as each appears complete in the folder, polled at most every ``POLL_S``.

    Args:
        spec, out: the dataset.
        mine: the shards this rank writes (``claim_shards``).

    ``pending``: every shard not complete when built; ``total``: their images (the bar's total).
    """

    def __init__(self, spec: sh.DatasetSpec, out: Path, mine: list[int]):
        self.spec, self.out, self.bar = spec, out, None
        self._names = {spec.shard_name(s): s for s in range(spec.num_shards)}
        done = self._listed()
        self.pending = sorted(set(mine) | (set(self._names.values()) - done))
        self.others = set(self.pending) - set(mine)
        self.total = sum(len(spec.shard_indices(s)) for s in self.pending)
        self.counted: set[int] = set()
        self._polled = time.monotonic()

    def _listed(self) -> set[int]:
        """The complete shards, from one listing of the folder."""
        return {self._names[e.name] for e in os.scandir(self.out) if e.name in self._names}

    def poll(self) -> int:
        """Count the other ranks' shards that appeared since the last poll; returns how many."""
        self._polled = time.monotonic()
        new = (self.others & self._listed()) - self.counted
        self.counted |= new
        if new and self.bar is not None:
            self.bar.update(sum(len(self.spec.shard_indices(s)) for s in new))
        return len(new)

    def update(self, n: int) -> None:
        """The writer's callback: ``n`` more of this rank's images."""
        if self.bar is not None:
            self.bar.update(n)
        if time.monotonic() - self._polled >= POLL_S:
            self.poll()

    def wait_for_others(self, stall_s: float) -> None:
        """Poll until every other rank's shard is counted, or none appeared for ``stall_s`` seconds."""
        last = time.monotonic()
        while self.counted != self.others:
            if self.poll():
                last = time.monotonic()
            elif time.monotonic() - last > stall_s:
                logger.info("rank 0: %d shard(s) of other ranks not written after %.0f s without a new one; the bar "
                            "stops here (the ranks writing them finish on their own)",
                            len(self.others - self.counted), stall_s)
                return
            time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parsers = _parsers()
    command = argv[0] if argv and argv[0] in ("search", "preview", "list", "laion-sample") else "write"
    args = parsers[command].parse_args(argv[1:] if command != "write" else argv)
    try:
        {"write": _cmd_write, "search": _cmd_search, "preview": _cmd_preview, "list": _cmd_list,
         "laion-sample": _cmd_laion_sample}[command](args)
    except (UsageError, ValueError, RuntimeError, OSError) as e:
        # A generator's or the shard writer's ValueError names the argument to change, an
        # OSError the path; the traceback would only bury it.
        parsers[command].exit(1, f"vitscale-synth: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
