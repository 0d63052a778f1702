"""Experiment schema, YAML loading with ``key.sub=value`` overrides, validation, and
composition of the DeepSpeed config.

This is the one place that builds a DeepSpeed config dict: batch sizes, precision,
ZeRO stage, optimizer and LR schedule are stated once here (in the experiment YAML)
and written into the preset from ``ds_configs/``, so the two can never disagree.

Validation happens in two steps, both before any process group starts:
``load_config`` checks keys, types and everything that needs only the config;
``validate_layout`` checks what also needs the world size (read from the launcher's
environment by ``vitscale.distributed.world_size_from_env``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# ds_configs/ ships inside the source tree next to the package (and inside the
# package when installed non-editable: setup.py copies it as package data).
_DS_CONFIG_DIRS = (
    Path(__file__).resolve().parent.parent / "ds_configs",
    Path(__file__).resolve().parent / "ds_configs",
)


@dataclass
class MoEConfig:
    """Soft MoE (Puigcerver et al. 2024) in place of the MLP of the last ``blocks`` blocks."""

    blocks: int = 0  # 0 = no MoE
    experts: int = 8  # experts per MoE layer (each an MLP of the block's width); replicated on every rank
    slots: int = 1  # slots per expert: each expert processes experts x slots weighted token averages per image


@dataclass
class PackingConfig:
    """NaViT sequence packing (vitscale.data.packing): images at native aspect ratio and sampled
    resolution (longest side in [min_size, data.image_size]) packed into sequences."""

    seq_len: int = 0  # tokens per packed sequence; 0 = no packing (a micro-batch is micro_batch sequences)
    max_images: int = 8  # image slots per sequence
    min_size: int = 0  # smallest longest side of the resolution sampling, pixels; 0 = data.image_size (no sampling)
    token_drop: float = 0.0  # fraction of each image's patches dropped at random


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16"  # a registered name: vitscale.models.list_models()
    # Weights to start from: a .safetensors / .pt state dict with our (= timm) names, an open_clip
    # checkpoint, or a vitscale run / checkpoint folder (any layout). A head of another class count
    # is replaced (freshly initialised), a position embedding of another grid resampled (timm's
    # resample_abs_pos_embed), so a pre-trained model fine-tunes at a new resolution on new classes.
    init: str | None = None
    # Architecture overrides; None keeps the size's default. Image size and class
    # count come from the data section (stated once).
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qkv_bias: bool | None = None
    qk_norm: bool | None = None  # LayerNorm on queries and keys per head (ViT-22B)
    bias: bool | None = None  # false: no bias in QKV and LayerNorms (ViT-22B); None keeps the model's
    parallel_block: bool | None = None  # attention and MLP in parallel, fused projections (ViT-22B)
    dual_patchnorm: bool | None = None  # LayerNorm before and after the patch embedding
    pos_embed: Literal["learned", "factorized"] | None = None  # factorized: row + column tables (NaViT, packing)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    class_token: bool | None = None
    global_pool: Literal["token", "avg"] | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over blocks
    # CLIP (model.name clip_*): tower overrides with open_clip's field names, e.g.
    # vision: {layers: 2, width: 64}, text: {context_length: 16, vocab_size: 1000};
    # embed_dim is the joint embedding, patch_size the image tower's.
    vision: dict | None = None
    text: dict | None = None


@dataclass
class DataConfig:
    source: str = "gratings"  # a generator (vitscale-synth list), rendered on the fly, a shard folder / pattern,
    # or fine-tuning data: digits (built in) or an image folder (one sub-folder per class)
    shards: Any = None  # shard folder, brace/glob pattern, or a list of them (vitscale-synth output); set -> read shards
    params: dict = field(default_factory=dict)  # on the fly: generator keyword arguments (as vitscale-synth --param)
    image_size: int = 64  # pixels, square
    num_classes: int = 10
    instances: int = 1000  # instances per class: one epoch = num_classes * instances samples
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch: int = 4  # batches prefetched per worker
    mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])  # normalisation, applied on the device
    std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    shuffle_buffer: int = 1000  # shards: samples each loader worker holds for shuffling (0/1 = off)
    augment: bool = True  # shards: random resized crop + horizontal flip (FDSL pre-training); on the fly never augments
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # random resized crop: area fraction range
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333])  # aspect ratio range (log-uniform)
    hflip: float = 0.5  # probability of a horizontal flip
    packing: PackingConfig = field(default_factory=PackingConfig)  # NaViT packing of a classifier's images
    # data.source=laion (img2dataset image-text shards, vitscale.data.laion):
    resampled: bool = True  # draw shards with replacement, epochs of epoch_samples (open_clip); false = exact epochs
    epoch_samples: int | None = None  # resampled: samples per epoch over all data ranks (default: the shards' sizes)
    filters: dict = field(default_factory=dict)  # metadata filters before decoding (vitscale.data.laion.FILTER_KEYS)
    canvas: int = 0  # side of the uint8 canvas images travel on (crop + resize on the device); 0 = image_size * 8/7
    # Fine-tuning (data.source=digits, an image folder, or labelled shards with rand_augment set;
    # vitscale.data.downstream): timm's transforms and DeiT's batch augmentation.
    test: str | None = None  # test split (digits | folder | shards): top-1/top-5 during (eval.every) and after training
    rand_augment: str | None = None  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (DeiT); None = off
    random_erasing: float = 0.0  # probability of timm's RandomErasing per image (DeiT: 0.25)
    mixup: float = 0.0  # Mixup alpha (DeiT: 0.8); 0 = off
    cutmix: float = 0.0  # CutMix alpha (DeiT: 1.0); 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # with both on: probability of CutMix instead of Mixup


@dataclass
class ParallelConfig:
    pipe: int = 1  # pipeline stages
    tensor: int = 1  # tensor-parallel degree; data = world_size / (pipe * tensor)
    zero: Literal[0, 1, 2, 3] = 0  # ZeRO stage
    offload: Literal["none", "optimizer", "all"] | None = None  # None: as the preset says; all = optimizer + params (ZeRO-3)
    ds_preset: str = "auto"  # a file in ds_configs/ (name or path); auto = zero{stage}.json
    partition: Literal["blocks", "parameters", "uniform"] = "blocks"  # how layers split over pipeline stages
    activation_checkpoint: int = 0  # recompute activations in chunks of this many blocks; 0 = off
    # Network interface for rendezvous and collectives (ib0, or a prefix such as ib); None =
    # VITSCALE_IFNAME / NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, else the launcher's choice.
    interface: str | None = None
    # Fail fast (issue 9): a collective that waits longer than timeout_s ends the job (NCCL /
    # gloo process-group timeout; NCCL's default is 10 minutes); a rank silent for
    # heartbeat_s (dead process or node) ends it too, naming the rank. 0 turns the heartbeat off.
    timeout_s: float = 300.0
    heartbeat_s: float = 60.0


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings, class token
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 10  # linear warm-up from warmup_init_ratio * lr
    warmup_init_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # cosine ends at min_lr_ratio * lr
    torch_adam: bool = False  # torch.optim.AdamW instead of DeepSpeed's fused / CPU Adam kernel
    layer_decay: float = 1.0  # layer-wise LR decay (BEiT / DeiT fine-tuning, timm's param_groups_layer_decay); 1 = off


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    seed: int = 0  # weights, data order and augmentation all derive from it
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch: int = 16  # samples per data-parallel rank per forward/backward
    global_batch: int = 32  # samples per optimizer step over all data-parallel ranks
    lr: float = 1e-3  # peak learning rate
    label_smoothing: float = 0.0
    loss: Literal["softmax", "sigmoid"] = "softmax"  # classifier: softmax cross-entropy, or sigmoid (multi-label, ViT-22B)
    # bf16 / fp32: stop after this many steps in a row with a NaN / Inf loss (fp16's loss
    # scaler skips such steps itself and lowers the scale); no checkpoint of them is written.
    max_bad_steps: int = 3
    ema: float = 0.0  # decay of an EMA of the weights (timm's ModelEmaV3, e.g. 0.9998), evaluated on data.test; 0 = off


@dataclass
class LogConfig:
    every: int = 10  # steps between train / throughput records
    progress: bool = True  # live progress bar on global rank 0
    warmup_steps: int = 2  # first steps left out of throughput figures (compilation, allocator warm-up)
    peak_tflops: float | None = None  # per-device peak for MFU; None = from the known-device table
    straggler_fraction: float = 0.8  # warn about a node whose pace is below this fraction of the median node's; 0 = never
    level: Literal["debug", "info", "warning"] = "info"


@dataclass
class RunConfig:
    dir: str = "runs/vit_tiny"  # run folder: config.yaml, ds_config.json, metrics.jsonl, checkpoints/


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    at_end: bool = True
    resume: str = "auto"  # auto (latest in run.dir/checkpoints, if any) | never | PATH to a checkpoint folder
    keep: int = 2  # most recent checkpoints kept; 0 keeps all
    # A checkpoint of another layout (parallel.pipe / tensor / data): error, or weights
    # (resharded weights and LR schedule; optimizer moments start afresh).
    reshard: Literal["error", "weights"] = "error"


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (and at the end); 0 = off (CLIP, parallel.pipe=1)
    zeroshot: str | None = None  # labelled webdataset / image folder for zero-shot top-1/top-5
    retrieval: str | None = None  # held-out image-text shards for recall@1/5/10
    classnames: str | None = None  # file (one per line) | imagenet; default: classnames.txt beside the data, else imagenet
    templates: str | None = None  # file ('{}' per line) | openai | simple; default: templates.txt beside the data, else openai
    batch_size: int = 64  # images per forward pass per rank
    max_samples: int = 0  # evaluate at most this many samples (0 = all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config that cannot work; the message names the key and the fix."""


# --------------------------------------------------------------------------- keys and types


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``train.lr``."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        keys += all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) else None


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not near:  # match on the last component too: "lr" -> "train.lr"
        leaf = key.split(".")[-1]
        near = [k for k in all_keys() if k.split(".")[-1] == leaf][:1]
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" or null" if type(None) in options else ""))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be a number, not a boolean")
    if isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r} must be of type {hint.__name__}, got {type(value).__name__}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Write a nested dict of values into the dataclass ``obj``, checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {values!r}")
    cls = type(obj)
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key(key)
        sub = _dataclass_type(cls, name)
        if sub is not None:
            _merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check_type(key, value, _hints(cls)[name]))


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    value = _read_yaml(raw, f"override '{text}'") if raw.strip() else None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load an experiment from YAML, apply ``key=value`` overrides, validate.

    Args:
        path: a YAML file (see ``configs/``), or None for the built-in defaults.
        overrides: strings such as ``"train.steps=100"``, applied in order.

    Returns:
        The validated Config (layout checks that need the world size come later,
        in ``validate_layout``).
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/vit_tiny.yaml")
        with open(path) as f:
            values = _read_yaml(f.read(), str(path))
        _merge(cfg, values or {})
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value))
    validate(cfg)
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML (YAML 1.1) reads "1e-3" as a string; this loader reads it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML text that ``load_config`` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))


# --------------------------------------------------------------------------- validation


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _validate_data(d: DataConfig, generators: list[str]) -> None:
    from vitscale.data.shards import is_shard_source, resolve_shards  # no torch import

    if d.source == "laion":
        return _validate_laion(d)
    from vitscale.data.downstream import is_downstream_source

    if is_downstream_source(d.source):
        return None  # digits or an image folder (vitscale.data.downstream); checked in _validate_finetune
    uses_shards = d.shards is not None or (d.source not in generators and is_shard_source(d.source))
    if not uses_shards and d.source not in generators:
        near = difflib.get_close_matches(d.source, generators, n=3, cutoff=0.5)
        _fail(f"data.source='{d.source}' is not available: it is neither a synthetic generator ("
              f"{', '.join(generators)}) nor a shard folder / pattern (or set data.shards)"
              + (f"; did you mean {', '.join(near)}?" if near else ""))
    if not isinstance(d.params, dict):
        _fail(f"data.params={d.params!r} must be a mapping of generator arguments, e.g. data.params={{num_points: 20000}}")
    if d.params and not uses_shards:
        from vitscale.data.synthetic import GENERATORS

        accepted = [a for a in GENERATORS.parameters(d.source) if a not in ("num_classes", "image_size", "seed")]
        unknown = sorted(set(d.params) - set(accepted))
        if unknown:
            _fail(f"data.params: {', '.join(unknown)} not an argument of generator '{d.source}'; "
                  f"it takes {', '.join(accepted) or 'none'}")
    if d.shuffle_buffer < 0:
        _fail(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (0 or 1 turns shuffling off)")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        _fail(f"data.crop_scale={d.crop_scale} must be [low, high] with 0 < low <= high <= 1")
    if len(d.crop_ratio) != 2 or not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        _fail(f"data.crop_ratio={d.crop_ratio} must be [low, high] with 0 < low <= high")
    if not 0 <= d.hflip <= 1:
        _fail(f"data.hflip={d.hflip} must be a probability in [0, 1]")
    if uses_shards:
        try:  # fail before any process group starts: the shards exist and hold what the config says
            _, described = resolve_shards(d.shards if d.shards is not None else d.source)
        except (ValueError, FileNotFoundError, OSError) as e:
            _fail(f"data.{'shards' if d.shards is not None else 'source'}: {e}")
        classes = {desc.get("classes") for desc in described} - {None}
        if len(classes) > 1:
            _fail(f"data shards mix datasets with {sorted(classes)} classes; their labels would collide")
        if classes and classes != {d.num_classes}:
            _fail(f"data.num_classes={d.num_classes} but the shards hold {min(classes)} classes (dataset.json); "
                  f"set data.num_classes={min(classes)}")


def _validate_laion(d: DataConfig) -> None:
    from vitscale.data.laion import check_filters, resolve_sources

    try:
        check_filters(d.filters)
        sources = resolve_sources(d.shards, sizes=not d.resampled or d.epoch_samples is None)
    except ValueError as e:
        _fail(str(e) if str(e).startswith("data.") else f"data.shards: {e}")
    if d.epoch_samples is not None and d.epoch_samples < 1:
        _fail(f"data.epoch_samples={d.epoch_samples} must be positive")
    if not d.resampled and any(s.sizes is None for s in sources):
        _fail("data.resampled=false (exact epochs) needs every shard's size: keep img2dataset's {shard}_stats.json "
              "beside the tars or write a sizes.json, or set data.resampled=true with data.epoch_samples")
    if d.resampled and d.epoch_samples is None and any(s.sizes is None for s in sources):
        _fail("data.epoch_samples is needed: the shard sizes are unknown (no _stats.json / sizes.json), so an epoch "
              "cannot be derived from them")
    if not d.resampled and len({s.weight for s in sources}) > 1:
        _fail("data.shards weights mix sources by resampling; set data.resampled=true, or drop the weights")
    if d.canvas < 0:
        _fail(f"data.canvas={d.canvas} must be >= 0 (0 = image_size * 8 / 7)")


def _validate_finetune(cfg: Config) -> None:
    """The fine-tuning keys (issue 10): downstream data, DeiT augmentation, layer decay, EMA."""
    d, o, t, p = cfg.data, cfg.optim, cfg.train, cfg.parallel
    if d.test is not None and d.test != "digits" and not _is_remote_path(d.test) and not _exists_pattern(d.test):
        _fail(f"data.test={d.test} does not exist; give digits, an image folder or labelled shards")
    from vitscale.data.downstream import num_classes_of

    for source, key in ((d.source, "data.source"), (d.test, "data.test")):
        classes = num_classes_of(source) if source else None
        if classes is not None and classes != d.num_classes:
            _fail(f"{key}={source} has {classes} classes but data.num_classes={d.num_classes}; "
                  f"set data.num_classes={classes}")
    for key in ("random_erasing", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(d, key) <= 1:
            _fail(f"data.{key}={getattr(d, key)} must be a probability in [0, 1]")
    if d.mixup < 0 or d.cutmix < 0:
        _fail(f"data.mixup={d.mixup} and data.cutmix={d.cutmix} are Beta alphas: >= 0 (0 turns each off)")
    if d.rand_augment is not None and not d.rand_augment.startswith("rand"):
        _fail(f"data.rand_augment={d.rand_augment!r} must be a timm RandAugment spec such as rand-m9-mstd0.5-inc1")
    mixing = d.mixup > 0 or d.cutmix > 0
    if (mixing or d.random_erasing or d.rand_augment) and (is_clip(cfg) or d.packing.seq_len):
        _fail("data.rand_augment / random_erasing / mixup / cutmix fine-tune a ViT classifier on whole images; "
              "turn them off for a CLIP or with data.packing")
    if mixing and t.micro_batch % 2:
        _fail(f"data.mixup / data.cutmix pair each image with another of its batch: train.micro_batch="
              f"{t.micro_batch} must be even")
    if mixing and t.loss == "sigmoid":
        _fail("data.mixup / data.cutmix give soft targets for softmax cross-entropy; set train.loss=softmax")
    if not 0 < o.layer_decay <= 1:
        _fail(f"optim.layer_decay={o.layer_decay} must be in (0, 1] (1 = off; DeiT / BEiT fine-tuning use 0.65-0.75)")
    if o.layer_decay < 1 and (p.pipe > 1 or is_clip(cfg)):
        _fail("optim.layer_decay needs a ViT classifier with parallel.pipe=1 (the layer index comes from the whole "
              "model's parameter names); set optim.layer_decay=1 or parallel.pipe=1")
    if d.test and (p.pipe > 1 or is_clip(cfg)):
        _fail("data.test evaluates a ViT classifier's top-1 on whole models: it needs parallel.pipe=1 (evaluate a "
              "pipeline run afterwards with vitscale-eval RUN --task linear-probe, or unset data.test)")
    if not 0 <= t.ema < 1:
        _fail(f"train.ema={t.ema} must be in [0, 1) (an EMA decay such as 0.9998; 0 = off)")
    if t.ema and (p.pipe > 1 or p.tensor > 1 or p.zero == 3):
        _fail(f"train.ema keeps a whole copy of the weights on each rank: it needs parallel.pipe=1, "
              f"parallel.tensor=1 and parallel.zero<3 (now {p.pipe}, {p.tensor}, {p.zero}); set train.ema=0")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.every < 0 or e.batch_size < 1 or e.max_samples < 0:
        _fail("eval.every and eval.max_samples must be >= 0 and eval.batch_size >= 1")
    if e.every and not is_clip(cfg) and not cfg.data.test:
        _fail(f"eval.every={e.every} evaluates a classifier on its test split: set data.test (digits, an image "
              "folder or labelled shards)")
    if e.every and is_clip(cfg) and not (e.zeroshot or e.retrieval):
        _fail(f"eval.every={e.every} but there is nothing to evaluate: set eval.zeroshot and / or eval.retrieval")
    if (e.zeroshot or e.retrieval) and e.every and not is_clip(cfg):
        _fail("eval.zeroshot / eval.retrieval evaluate a CLIP; model.name is not a CLIP model")
    if e.every and cfg.parallel.pipe > 1:
        _fail("eval.every needs parallel.pipe=1 (evaluation runs the whole model on each rank's share); evaluate "
              "pipeline checkpoints with vitscale-eval CHECKPOINT --task zeroshot|retrieval")
    for key in ("zeroshot", "retrieval"):
        path = getattr(e, key)
        if e.every and path and not _is_remote_path(path) and not _exists_pattern(path):
            _fail(f"eval.{key}={path} does not exist")


def _is_remote_path(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _exists_pattern(path: str) -> bool:
    if Path(path).exists():
        return True
    import braceexpand

    first = next(iter(braceexpand.braceexpand(path)), None)
    return first is not None and Path(first).exists()


def validate(cfg: Config) -> None:
    """Checks that need only the config. Raises ConfigError naming the key and the fix."""
    from vitscale.data.synthetic import list_generators
    from vitscale.models import list_models

    t, p, d, o, log, ck = cfg.train, cfg.parallel, cfg.data, cfg.optim, cfg.log, cfg.checkpoint
    if cfg.model.name not in list_models():
        near = difflib.get_close_matches(cfg.model.name, list_models(), n=3, cutoff=0.4)
        _fail(f"model.name='{cfg.model.name}' is not a registered model"
              + (f"; did you mean {', '.join(near)}?" if near else "")
              + " (vitscale.models.list_models() lists them all)")
    for key, value, low in [("train.steps", t.steps, 1), ("train.micro_batch", t.micro_batch, 1),
                            ("train.global_batch", t.global_batch, 1), ("parallel.pipe", p.pipe, 1),
                            ("parallel.tensor", p.tensor, 1), ("data.image_size", d.image_size, 1),
                            ("data.num_classes", d.num_classes, 1), ("data.instances", d.instances, 1),
                            ("data.num_workers", d.num_workers, 0), ("data.prefetch", d.prefetch, 1),
                            ("log.every", log.every, 1), ("log.warmup_steps", log.warmup_steps, 0),
                            ("checkpoint.every", ck.every, 0), ("checkpoint.keep", ck.keep, 0),
                            ("train.max_bad_steps", t.max_bad_steps, 1), ("parallel.heartbeat_s", p.heartbeat_s, 0),
                            ("optim.warmup_steps", o.warmup_steps, 0)]:
        if value < low:
            _fail(f"{key}={value} must be >= {low}")
    if t.lr <= 0:
        _fail(f"train.lr={t.lr} must be > 0")
    if p.timeout_s <= 0:
        _fail(f"parallel.timeout_s={p.timeout_s} must be > 0 seconds, e.g. 300")
    if not 0 <= log.straggler_fraction < 1:
        _fail(f"log.straggler_fraction={log.straggler_fraction} must be in [0, 1), e.g. 0.8 (0 turns the warning off)")
    if t.global_batch % t.micro_batch:
        _fail(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch} "
              f"(x data-parallel ranks); e.g. train.global_batch={t.micro_batch * max(1, round(t.global_batch / t.micro_batch))}")
    if len(d.mean) != 3 or len(d.std) != 3:
        _fail(f"data.mean and data.std need 3 values (RGB), got {d.mean} and {d.std}")
    if len(o.betas) != 2:
        _fail(f"optim.betas={o.betas} needs two values, e.g. [0.9, 0.999]")
    _validate_data(d, list_generators())
    if d.source == "laion" and not is_clip(cfg):
        _fail(f"data.source=laion yields image-text pairs for a CLIP; model.name={cfg.model.name} is a classifier "
              "(use a clip_* model, or synthetic / shard data)")
    _validate_eval(cfg)
    _validate_finetune(cfg)
    if p.offload == "all" and p.zero != 3:
        _fail(f"parallel.offload=all offloads parameters, which only ZeRO-3 does; set parallel.zero=3 "
              f"or parallel.offload=optimizer (now parallel.zero={p.zero})")
    if p.offload == "optimizer" and p.zero == 0:
        _fail("parallel.offload=optimizer needs ZeRO 1, 2 or 3; set parallel.zero=1 or parallel.offload=none")
    if p.pipe > 1 and p.zero > 1:
        # DeepSpeed asserts this inside PipelineModule; say it before any process starts.
        _fail(f"parallel.zero={p.zero} cannot run with parallel.pipe={p.pipe}: DeepSpeed's pipeline engine "
              f"supports only ZeRO 0 and 1; set parallel.zero=1 or parallel.pipe=1")
    if is_clip(cfg):
        m, defaults = cfg.model, ModelConfig()
        stated = [k for k in _VIT_ONLY if getattr(m, k) != getattr(defaults, k)]
        if stated:
            _fail(f"model.{stated[0]} is a ViT option; a CLIP states its towers in model.vision / model.text "
                  f"(open_clip's names, e.g. model.vision={{layers: 2}} model.text={{heads: 4}})")
    elif cfg.model.vision or cfg.model.text:
        _fail(f"model.vision / model.text configure CLIP towers; {cfg.model.name} is a ViT classifier")
    try:
        arch = model_arch(cfg)
    except ValueError as e:  # the model's own checks (e.g. image size vs patch size)
        raise ConfigError(f"model {cfg.model.name} with data.image_size={d.image_size}: {e}") from None
    # (where, heads, width, mlp_ratio, blocks) of each transformer stack the layout splits
    stacks = ([("the image tower of ", arch.vision.heads, arch.vision.width, arch.vision.mlp_ratio, arch.vision.layers),
               ("the text tower of ", arch.text.heads, arch.text.width, arch.text.mlp_ratio, arch.text.layers)]
              if is_clip(cfg) else [("", arch.num_heads, arch.embed_dim, arch.mlp_ratio, arch.depth)])
    for where, heads, width, ratio, _ in stacks:
        if heads % p.tensor:
            ok = [k for k in range(1, heads + 1) if heads % k == 0]
            _fail(f"parallel.tensor={p.tensor} must divide the {heads} attention heads of "
                  f"{where}{cfg.model.name}; use one of {', '.join(map(str, ok))}")
        if int(width * ratio) % p.tensor:
            _fail(f"parallel.tensor={p.tensor} must divide the MLP width {int(width * ratio)} of "
                  f"{where}{cfg.model.name}")
    if not is_clip(cfg):
        _validate_arch(cfg, arch)
    blocks = sum(stack[-1] for stack in stacks)
    if p.pipe > blocks:
        _fail(f"parallel.pipe={p.pipe} is more stages than the {blocks} blocks of {cfg.model.name}; "
              f"use parallel.pipe <= {blocks}")
    if p.activation_checkpoint < 0:
        _fail(f"parallel.activation_checkpoint={p.activation_checkpoint} must be >= 0 (blocks per recomputed "
              "chunk; 0 turns it off)")
    if ck.resume not in ("auto", "never") and not Path(ck.resume).exists():
        _fail(f"checkpoint.resume='{ck.resume}' is neither auto, never, nor an existing checkpoint folder")
    if cfg.model.init is not None and not (Path(cfg.model.init).is_file() or _is_checkpoint_dir(cfg.model.init)):
        _fail(f"model.init='{cfg.model.init}' is not a file or a vitscale run / checkpoint folder; give a "
              ".safetensors or .pt state dict (ours, timm's or open_clip's) or a run folder with checkpoints")
    compose_ds_config(cfg, data_parallel=1, check_batch=False)  # surfaces preset problems now


def _is_checkpoint_dir(path: str) -> bool:
    p = Path(path)
    return (p / "config.yaml").is_file() or (p.parent.name == "checkpoints" and p.is_dir())


def _validate_arch(cfg: Config, arch) -> None:
    """The architecture options (issue 11) against each other, the data and the layout."""
    m, pk = cfg.model, cfg.data.packing
    if m.bias is False and m.qkv_bias:
        _fail("model.bias=false drops the QKV biases but model.qkv_bias=true asks for them; set one of them")
    if m.moe.blocks < 0 or m.moe.experts < 1 or m.moe.slots < 1:
        _fail(f"model.moe.blocks={m.moe.blocks} must be >= 0, model.moe.experts={m.moe.experts} and "
              f"model.moe.slots={m.moe.slots} >= 1")
    if not pk.seq_len:
        return
    grid = arch.grid_size
    if arch.pos_embed != "factorized" or arch.class_token or arch.global_pool != "avg":
        _fail("data.packing needs per-image average pooling and position embeddings that fit any grid: set "
              "model.pos_embed=factorized model.class_token=false model.global_pool=avg")
    if cfg.parallel.pipe > 1:
        _fail(f"data.packing with parallel.pipe={cfg.parallel.pipe} is not supported (the pipeline sends one "
              "tensor between stages, packed sequences need their segment ids in every stage); set parallel.pipe=1")
    if arch.moe_blocks:
        _fail("data.packing with model.moe is not supported: Soft MoE slots would mix the images of a packed "
              "sequence; set model.moe.blocks=0 or data.packing.seq_len=0")
    if pk.max_images < 1 or not 0 <= pk.token_drop < 1 or pk.min_size < 0 or pk.min_size > cfg.data.image_size:
        _fail(f"data.packing: max_images={pk.max_images} must be >= 1, token_drop={pk.token_drop} in [0, 1), "
              f"min_size={pk.min_size} between 0 and data.image_size={cfg.data.image_size}")
    if pk.min_size and pk.min_size < arch.patch_size:
        _fail(f"data.packing.min_size={pk.min_size} is smaller than one patch ({arch.patch_size} px)")
    needed = round(grid * grid * (1 - pk.token_drop))
    if pk.seq_len < needed:
        _fail(f"data.packing.seq_len={pk.seq_len} cannot hold one {cfg.data.image_size} px image "
              f"({needed} tokens after token_drop={pk.token_drop}); use data.packing.seq_len >= {needed}")


def model_arch(cfg: Config):
    """The model's architecture config (no weights are allocated)."""
    from vitscale.models import create_model
    import torch

    with torch.device("meta"):
        return create_model(cfg.model.name, **model_kwargs(cfg)).cfg


def is_clip(cfg: Config) -> bool:
    """Whether the model is a CLIP (image-text, contrastive) rather than a classifier."""
    return cfg.model.name.startswith("clip_")


# Model keys that only a ViT classifier has; a CLIP states its towers in model.vision / model.text.
_VIT_ONLY = ("depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "global_pool",
             "drop_rate", "attn_drop_rate", "drop_path_rate", "bias", "parallel_block", "dual_patchnorm", "pos_embed",
             "moe")


def model_kwargs(cfg: Config) -> dict:
    """Keyword arguments for ``create_model``: the model section's overrides plus data-derived sizes."""
    m = cfg.model
    if is_clip(cfg):
        vision = {**(m.vision or {}), "image_size": cfg.data.image_size}
        if m.patch_size is not None:
            vision["patch_size"] = m.patch_size
        kwargs = {"vision": vision, "text": dict(m.text or {})}
        if m.embed_dim is not None:
            kwargs["embed_dim"] = m.embed_dim
        return kwargs
    kwargs = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name not in ("name", "init", "vision", "text", "bias", "moe") and getattr(m, f.name) is not None}
    if m.bias is not None:  # one switch for the QKV and LayerNorm biases, as ViT-22B drops both
        kwargs.setdefault("qkv_bias", m.bias)
        kwargs["norm_bias"] = m.bias
    if m.moe.blocks:
        kwargs.update(moe_blocks=m.moe.blocks, moe_experts=m.moe.experts, moe_slots=m.moe.slots)
    kwargs.update(img_size=cfg.data.image_size, num_classes=cfg.data.num_classes)
    return kwargs


@dataclass(frozen=True)
class Layout:
    world_size: int
    pipe: int
    tensor: int
    data: int
    grad_accum: int


def validate_layout(cfg: Config, world_size: int) -> Layout:
    """Checks that need the world size: divisibility of ranks and of batch sizes."""
    p, t = cfg.parallel, cfg.train
    model_ranks = p.pipe * p.tensor
    if world_size % model_ranks:
        _fail(f"world size {world_size} is not divisible by parallel.pipe x parallel.tensor = "
              f"{p.pipe} x {p.tensor} = {model_ranks}; launch a multiple of {model_ranks} processes "
              f"or change the layout")
    data = world_size // model_ranks
    per_step = t.micro_batch * data
    if t.global_batch % per_step:
        good = per_step * max(1, round(t.global_batch / per_step))
        _fail(f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch x data-parallel "
              f"ranks = {t.micro_batch} x {data} = {per_step}; e.g. train.global_batch={good}, or a "
              f"train.micro_batch that divides {t.global_batch // data if t.global_batch % data == 0 else t.global_batch}")
    return Layout(world_size, p.pipe, p.tensor, data, t.global_batch // per_step)


# --------------------------------------------------------------------------- DeepSpeed config

def own_clipping(cfg: Config) -> bool:
    """Whether vitscale, not DeepSpeed, clips the gradients of this config (see compose_ds_config)."""
    return cfg.parallel.pipe > 1 and cfg.parallel.zero == 0 and cfg.train.precision == "fp32"


# Keys that the experiment config states; a preset must not state them too.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "optimizer", "scheduler", "gradient_clipping")


def find_preset(name: str) -> Path:
    candidates = [Path(name)] + [d / name for d in _DS_CONFIG_DIRS] + [d / f"{name}.json" for d in _DS_CONFIG_DIRS]
    for c in candidates:
        if c.is_file():
            return c
    available = sorted({p.stem for d in _DS_CONFIG_DIRS if d.is_dir() for p in d.glob("*.json")})
    raise ConfigError(f"parallel.ds_preset='{name}' not found; choose one of {', '.join(available)} or give a path")


def compose_ds_config(cfg: Config, data_parallel: int, check_batch: bool = True) -> dict:
    """The DeepSpeed config: the preset plus everything the experiment states.

    Args:
        cfg: the experiment.
        data_parallel: number of data-parallel ranks (from ``validate_layout``).
        check_batch: with False, batch sizes are written for ``data_parallel`` without
            checking divisibility (used during the world-size-free validation).

    Returns:
        A dict for ``deepspeed.initialize(config=...)``.
    """
    p, t, o = cfg.parallel, cfg.train, cfg.optim
    preset_name = p.ds_preset if p.ds_preset != "auto" else f"zero{p.zero}"
    path = find_preset(preset_name)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed preset {path} is not valid JSON: {e}") from None
    for key in _OWNED_KEYS:
        if key in ds:
            raise ConfigError(f"DeepSpeed preset {path} sets '{key}', which the experiment config owns "
                              f"(train.*, optim.*); remove it from the preset")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", p.zero) != p.zero:
        raise ConfigError(f"parallel.zero={p.zero} but DeepSpeed preset {path.name} is for ZeRO stage "
                          f"{zero['stage']}; set parallel.zero={zero['stage']} or choose another parallel.ds_preset")
    zero["stage"] = p.zero
    if p.offload is not None:
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
        if p.offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if p.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if p.zero == 0:
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                raise ConfigError(f"DeepSpeed preset {path.name} offloads ({key}) but parallel.zero=0; "
                                  f"set parallel.zero to 1-3 or parallel.offload=none")

    for name in ("fp16", "bf16"):
        section = ds.setdefault(name, {})
        wanted = t.precision == name
        if section.get("enabled", wanted) != wanted:
            raise ConfigError(f"DeepSpeed preset {path.name} sets {name}.enabled={section['enabled']} but "
                              f"train.precision={t.precision}; precision is set by train.precision only")
        section["enabled"] = wanted
    if t.precision == "fp16":
        ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1, **ds["fp16"]}

    data = max(1, data_parallel)
    ds["train_batch_size"] = t.global_batch
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = max(1, t.global_batch // (t.micro_batch * data))
    if check_batch and t.micro_batch * data * ds["gradient_accumulation_steps"] != t.global_batch:
        raise ConfigError("batch sizes do not divide; call validate_layout first")
    # DeepSpeed's fp32 ZeRO-0 clipping (runtime.utils.clip_grad_norm_) counts replicated
    # parameters only where the *model*-parallel rank is 0, and that rank spans pipe x tensor:
    # every stage after the first drops out of the norm. There the engine clips instead
    # (vitscale.train.engine.clip_in_step), with the tensor-rank rule the ZeRO optimizers use.
    ds["gradient_clipping"] = 0.0 if own_clipping(cfg) else o.grad_clip
    if p.pipe > 1 and p.tensor > 1 and is_clip(cfg):
        # DeepSpeed splits what stages send over the tensor ranks only when a single float
        # tensor travels (runtime/pipe/engine.py asserts it); a CLIP sends two.
        ds["pipeline"] = {**ds.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": t.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
        "torch_adam": o.torch_adam}}
    # The LR schedule is ours (vitscale.train.engine.lr_lambda) and handed to
    # deepspeed.initialize: DeepSpeed's WarmupCosineLR runs its first two steps at lr 0
    # and never applies the peak lr itself. DeepSpeed still checkpoints its state.
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; silence DeepSpeed's own step prints
    ds.setdefault("wall_clock_breakdown", False)
    return copy.deepcopy(ds)
