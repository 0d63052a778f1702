"""Data sources: one contract for every kind of training data, each registered by name.

| source       | reads                                                      | a batch holds             |
| ------------ | ---------------------------------------------------------- | ------------------------- |
| ``synthetic`` | a generator rendered on the fly (``synthetic_loader``)    | images, labels            |
| ``shards``    | synthetic WebDataset shards (``synthetic_loader``)        | images, labels            |
| ``downstream``| digits, an image folder, labelled shards (``downstream``) | images, labels            |
| ``captions``  | synthetic images with captions, for a CLIP (``captions``) | images, tokens            |
| ``laion``     | img2dataset image-text shards (``laion``)                 | canvases, boxes, tokens   |

``source_name(data, task)`` picks the source a config reads; every source class checks the data
section before any process starts (``check``), is built with one signature (``build(cfg, ctx)``),
yields typed ``Batch`` es, and has ``state_dict`` / ``load_state_dict`` / ``stats`` /
``fingerprint`` (no-ops where nothing is kept or counted), so the training loop treats all
sources alike. NaViT packing (``data.packing``) is a stage over a classifier's source.

What a source keeps and counts is declared on its class (``stateful``, ``counters``), so ranks
that hold no source (inner pipeline stages) still know which collectives to join.
"""
from __future__ import annotations

import difflib
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Literal

import torch

from vitscale.config.schema import Config, ConfigError
from vitscale.data.captions import build_caption_loader
from vitscale.data.downstream import build_downstream_loader, num_classes_of, uses_downstream_loader
from vitscale.data.laion import BAD, COUNTERS, build_laion_loader, check_filters, describe_stats, resolve_sources
from vitscale.data.packing import pack_batches
from vitscale.data.shards import is_shard_source, resolve_shards
from vitscale.data.synthetic import GENERATORS, list_generators
from vitscale.data.synthetic_loader import build_shard_loader, build_synthetic_loader, make_generator
from vitscale.registry import Registry

Task = Literal["classification", "image_text"]


@dataclass
class Batch:
    """One micro-batch as a loader hands it over: host memory, uint8 pixels (normalised on the device)."""

    images: torch.Tensor | None = None  # uint8 (B, 3, H, W); image-text shards: canvases (B, C, C, 3), see boxes
    labels: torch.Tensor | None = None  # int64 classes (B,); packed sequences: (B, K) per image slot, -1 = empty
    instances: torch.Tensor | None = None  # data.render=device: int64 (B,), rendered on the device with the labels
    tokens: torch.Tensor | None = None  # int64 caption token ids (B, context_length)
    boxes: torch.Tensor | None = None  # float32 (B, 5): x0, y0, x1, y1, flip of the crop cut from each canvas
    patches: torch.Tensor | None = None  # packed sequences: uint8 (B, L, C * p * p)
    coords: torch.Tensor | None = None  # packed sequences: int64 (B, L, 2), (row, column) of each patch
    segments: torch.Tensor | None = None  # packed sequences: int64 (B, L), image 1..k of each token, 0 = padding

    @property
    def size(self) -> int:
        """Samples (or packed sequences) in the batch."""
        first = self.images if self.images is not None else self.patches if self.patches is not None else self.labels
        return int(first.shape[0])


@dataclass(frozen=True)
class LoaderContext:
    """What a source needs besides the config: this data rank's place and the model's reading needs."""

    data_rank: int = 0
    data_world: int = 1
    start_step: int = 0  # optimizer step to start from (position-exact sources skip to it)
    pin_memory: bool = False
    tokenizer: Callable | None = None  # captions -> (N, context) int64 token ids (image-text sources)
    patch_size: int = 16  # the model's patch size (NaViT packing cuts images into such patches)


class DataSource:
    """Endless micro-batches of one data rank. The base keeps nothing and counts nothing."""

    task: ClassVar[Task] = "classification"
    stateful: ClassVar[bool] = False  # state_dict() holds a position a checkpoint must keep
    counters: ClassVar[tuple[str, ...]] = ()  # what stats() counts; summed over data ranks into "data" records

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Check the data section against what this source reads; raise ConfigError naming the fix."""

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        raise NotImplementedError

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """This data rank's position, for a checkpoint ({} where the step alone determines it)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s position (before iterating)."""

    def stats(self) -> dict[str, int]:
        """This data rank's counters, named by ``counters``."""
        return {}

    def fingerprint(self) -> int | None:
        """A checksum of the last batch's sample identities, which tensor-parallel peers (that must
        read the same batch) compare; None where the source cannot tell."""
        return None

    @classmethod
    def summarize(cls, totals: dict[str, int]) -> tuple[dict, str]:
        """The counters summed over data ranks -> (fields of a ``data`` record, a log line)."""
        return dict(totals), ", ".join(f"{v} {k}" for k, v in totals.items())


SOURCES: Registry[type[DataSource]] = Registry("data source", "vitscale.data.sources.SOURCES.names()")


def register_source(name: str):
    """Class decorator registering a ``DataSource`` subclass under ``name``."""
    return SOURCES.register(name)


def source_class(name: str) -> type[DataSource]:
    """The registered class of source ``name``."""
    return SOURCES.get(name)


def source_name(cfg: Config, task: Task) -> str:
    """The registered source that reads ``cfg.data`` for a model of ``task``."""
    d = cfg.data
    if d.source == "laion":
        return "laion"
    if task == "image_text":
        return "captions"
    if uses_downstream_loader(d):
        return "downstream"
    if d.shards is not None or (d.source not in list_generators() and is_shard_source(d.source)):
        return "shards"
    return "synthetic"


def build_source(name: str, cfg: Config, ctx: LoaderContext) -> DataSource:
    """This data rank's source ``name`` for ``cfg``, packed into sequences when ``data.packing`` asks."""
    source = source_class(name).build(cfg, ctx)
    return Packed(source, cfg, ctx) if cfg.data.packing.seq_len else source


def _loader_args(cfg: Config, ctx: LoaderContext) -> dict:
    t = cfg.train
    return dict(seed=t.seed, micro_batch=t.micro_batch, global_batch=t.global_batch, data_rank=ctx.data_rank,
                data_world=ctx.data_world, start_step=ctx.start_step, pin_memory=ctx.pin_memory)


# -- synthetic images: on the fly or from shards -----------------------------------------------------

def _check_generator_source(cfg: Config) -> None:
    """data.source names a generator (or shards); data.params are that generator's arguments."""
    d, generators = cfg.data, list_generators()
    uses_shards = d.shards is not None or (d.source not in generators and is_shard_source(d.source))
    if not uses_shards and d.source not in generators:
        near = difflib.get_close_matches(d.source, generators, n=3, cutoff=0.5)
        raise ConfigError(f"data.source='{d.source}' is not available: it is neither a synthetic generator ("
                          f"{', '.join(generators)}) nor a shard folder / pattern (or set data.shards)"
                          + (f"; did you mean {', '.join(near)}?" if near else ""))
    if d.params and not uses_shards:
        accepted = [a for a in GENERATORS.parameters(d.source) if a not in ("num_classes", "image_size", "seed")]
        unknown = sorted(set(d.params) - set(accepted))
        if unknown:
            raise ConfigError(f"data.params: {', '.join(unknown)} not an argument of generator '{d.source}'; "
                              f"it takes {', '.join(accepted) or 'none'}")
    if uses_shards:
        _check_shards(cfg)


def _check_shards(cfg: Config) -> None:
    """Fail before any process group starts: the shards exist and hold what the config says."""
    d = cfg.data
    try:
        _, described = resolve_shards(d.shards if d.shards is not None else d.source)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.{'shards' if d.shards is not None else 'source'}: {e}") from None
    classes = {desc.get("classes") for desc in described} - {None}
    if len(classes) > 1:
        raise ConfigError(f"data shards mix datasets with {sorted(classes)} classes; their labels would collide")
    if classes and classes != {d.num_classes}:
        raise ConfigError(f"data.num_classes={d.num_classes} but the shards hold {min(classes)} classes "
                          f"(dataset.json); set data.num_classes={min(classes)}")


class _Pairs(DataSource):
    """A loader of (images, second) tuples -> Batches; ``second`` is the batch field named ``field``."""

    field: ClassVar[str] = "labels"

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)  # starts the loader's workers now, under the caller's signal mask
        return (Batch(images=images, **{self.field: second}) for images, second in batches)


@register_source("synthetic")
class OnTheFly(_Pairs):
    """A generator rendered in the loader workers, in the position-exact order of ``StepSampler``:
    every layout and every resume sees the same samples in each step. With ``data.render=device``
    the batches carry labels and instances only, rendered by the training step (``device_renderer``)."""

    check = classmethod(lambda cls, cfg: _check_generator_source(cfg))

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        d = cfg.data
        return cls(build_synthetic_loader(d.source, d.num_classes, d.image_size, d.instances, num_workers=d.num_workers,
                                          prefetch=d.prefetch, params=d.params, render=d.render,
                                          **_loader_args(cfg, ctx)), d.render)

    def __init__(self, loader, render: str = "workers"):
        super().__init__(loader)
        self.render = render

    def __iter__(self) -> Iterator[Batch]:
        if self.render != "device":
            return super().__iter__()
        return (Batch(labels=labels, instances=instances) for labels, instances in iter(self.loader))


def device_generators() -> list[str]:
    """The generators that can render on the training device (``render_batch``)."""
    return [name for name in list_generators() if hasattr(GENERATORS.get(name), "render_batch")]


def check_render(cfg: Config, name: str) -> None:
    """``data.render=device`` needs on-the-fly data (source ``name`` synthetic) from a generator with
    ``render_batch``; raise ConfigError naming the fix otherwise."""
    d = cfg.data
    if d.render != "device":
        return
    if name != "synthetic":
        raise ConfigError(f"data.render=device renders synthetic generators on the fly, but data.source={d.source}"
                          f"{' with data.shards' if d.shards is not None else ''} is read as '{name}' data; set "
                          "data.render=workers, or data.source to one of " + ", ".join(device_generators()))
    if d.source not in device_generators():
        raise ConfigError(f"data.render=device: generator '{d.source}' has no device renderer (render_batch); "
                          f"those that have one are {', '.join(device_generators())}; set data.render=workers")


def device_renderer(cfg: Config) -> Callable[[torch.Tensor, torch.Tensor, torch.device], torch.Tensor] | None:
    """``render_batch`` of the run's generator when ``data.render=device`` (else None): what the
    training step calls on a Batch of labels and instances."""
    d = cfg.data
    if d.render != "device":
        return None
    return make_generator(d.source, d.num_classes, d.image_size, cfg.train.seed, d.params).render_batch


@register_source("shards")
class SyntheticShards(_Pairs):
    """``vitscale-synth`` shards, streamed, shuffled and augmented; a resume in the same layout
    replays each worker's stream to its position (``synthetic_loader.ShardStream``)."""

    check = classmethod(lambda cls, cfg: _check_generator_source(cfg))

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        d = cfg.data
        return cls(build_shard_loader(d.shards if d.shards is not None else d.source, d.image_size,
                                      num_classes=d.num_classes, num_workers=d.num_workers, prefetch=d.prefetch,
                                      shuffle_buffer=d.shuffle_buffer, augment=d.augment,
                                      crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio), hflip=d.hflip,
                                      **_loader_args(cfg, ctx)))


@register_source("downstream")
class Downstream(_Pairs):
    """Fine-tuning data (digits, an image folder, labelled shards) through timm's train transform."""

    @classmethod
    def check(cls, cfg: Config) -> None:
        check_classes(cfg.data.source, "data.source", cfg.data.num_classes)

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        return cls(build_downstream_loader(cfg.data, **_loader_args(cfg, ctx)))


def check_classes(source: str | None, key: str, num_classes: int) -> None:
    """A downstream source (training or test split) that says its class count must match ``data.num_classes``."""
    classes = num_classes_of(source) if source else None
    if classes is not None and classes != num_classes:
        raise ConfigError(f"{key}={source} has {classes} classes but data.num_classes={num_classes}; "
                          f"set data.num_classes={classes}")


# -- image-text ---------------------------------------------------------------------------------------

@register_source("captions")
class Captions(_Pairs):
    """Synthetic images with captions that describe them (a CLIP trained with nothing downloaded),
    position-exact like ``synthetic``."""

    task = "image_text"
    field = "tokens"
    check = classmethod(lambda cls, cfg: _check_generator_source(cfg))

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        d, tokenizer = cfg.data, ctx.tokenizer
        return cls(build_caption_loader(d.source, d.num_classes, d.image_size, d.instances, num_workers=d.num_workers,
                                        prefetch=d.prefetch, params=d.params, context_length=tokenizer.context_length,
                                        vocab_size=tokenizer.vocab_size, **_loader_args(cfg, ctx)))


@register_source("laion")
class ImageText(DataSource):
    """img2dataset shards: split by data rank, equal batches on every rank, exact resume from the
    position each worker reached (``laion.LaionLoader``), bad samples counted."""

    task = "image_text"
    stateful = True
    counters = COUNTERS

    @classmethod
    def check(cls, cfg: Config) -> None:
        d = cfg.data
        try:
            check_filters(d.filters)
            sources = resolve_sources(d.shards, sizes=not d.resampled or d.epoch_samples is None)
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("data.") else f"data.shards: {e}") from None
        if not d.resampled and any(s.sizes is None for s in sources):
            raise ConfigError("data.resampled=false (exact epochs) needs every shard's size: keep img2dataset's "
                              "{shard}_stats.json beside the tars or write a sizes.json, or set data.resampled=true "
                              "with data.epoch_samples")
        if d.resampled and d.epoch_samples is None and any(s.sizes is None for s in sources):
            raise ConfigError("data.epoch_samples is needed: the shard sizes are unknown (no _stats.json / "
                              "sizes.json), so an epoch cannot be derived from them")
        if not d.resampled and len({s.weight for s in sources}) > 1:
            raise ConfigError("data.shards weights mix sources by resampling; set data.resampled=true, or drop "
                              "the weights")

    def __init__(self, cfg: Config, ctx: LoaderContext):
        super().__init__(None)
        self.cfg, self.ctx = cfg, ctx
        self.load_state_dict({})

    @classmethod
    def build(cls, cfg: Config, ctx: LoaderContext) -> DataSource:
        return cls(cfg, ctx)

    def load_state_dict(self, state: dict) -> None:
        # The position goes into the stream its workers are built from (they start at iteration).
        cfg, ctx = self.cfg, self.ctx
        self.loader = build_laion_loader(cfg.data, ctx.tokenizer, cfg.train.seed, cfg.train.micro_batch,
                                         ctx.data_rank, ctx.data_world, cfg.data.image_size, state=state or None,
                                         pin_memory=ctx.pin_memory)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)  # starts the loader's workers now, under the caller's signal mask
        return (Batch(images=images, tokens=tokens, boxes=boxes) for images, tokens, boxes in batches)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def stats(self) -> dict[str, int]:
        return self.loader.stats()

    def fingerprint(self) -> int | None:
        return zlib.crc32("\n".join(self.loader.last_keys).encode())

    @classmethod
    def summarize(cls, totals: dict[str, int]) -> tuple[dict, str]:
        bad = sum(totals[k] for k in BAD)
        return {**totals, "bad": bad, "bad_fraction": bad / max(totals["read"], 1)}, describe_stats(totals)


# -- NaViT packing ------------------------------------------------------------------------------------

class Packed(DataSource):
    """NaViT packing as a stage over a classifier's source: its image micro-batches -> micro-batches
    of packed sequences (``vitscale.data.packing``). Not position-exact: a resumed run packs afresh."""

    def __init__(self, source: DataSource, cfg: Config, ctx: LoaderContext):
        super().__init__(source)
        self.source, self.cfg, self.ctx = source, cfg, ctx

    def __iter__(self) -> Iterator[Batch]:
        pk, d = self.cfg.data.packing, self.cfg.data
        batches = iter(self.source)  # starts the loader's workers now, under the caller's signal mask
        packed = pack_batches(((b.images, b.labels) for b in batches), self.cfg.train.micro_batch,
                              patch_size=self.ctx.patch_size, seq_len=pk.seq_len, max_images=pk.max_images,
                              max_size=d.image_size, min_size=pk.min_size or None, token_drop=pk.token_drop,
                              seed=self.cfg.train.seed * 1000 + self.ctx.data_rank)
        return (Batch(labels=labels, patches=patches, coords=coords, segments=segments)
                for patches, coords, segments, labels in packed)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)

    def stats(self) -> dict[str, int]:
        return self.source.stats()


__all__ = ["Batch", "DataSource", "LoaderContext", "SOURCES", "Task", "build_source", "check_classes",
           "register_source", "source_class", "source_name"]
