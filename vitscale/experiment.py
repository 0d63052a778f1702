"""An experiment: the config resolved against the registries and checked as a whole, before any
process starts.

``load_experiment(path, overrides)`` is ``config.load_config`` (keys, types, everything that needs
only the config), then the model the config names (``models.resolve_model``: built once, on the
meta device, with the loss ``train.loss`` names for its kind), the data source that reads its data
section (``data.sources``), and the checks across the parts: a CLIP reads image-text data, the
heads split over the tensor ranks, packing needs a model that takes packed sequences, evaluation
fits the model's kind. Every start
(``vitscale-train``, ``vitscale-recipe``, the benchmarks, the export and evaluation tools) goes
through here, so nothing downstream asks the config what kind of model it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitscale.config import Config, ConfigError, load_config
from vitscale.config.validation import check_evaluation_data
from vitscale.data.sources import Task, check_classes, check_render, source_class, source_name
from vitscale.models.parallelize import check_layout
from vitscale.models.sparsity import check_sparsity
from vitscale.models.spec import ModelSpec, resolve_model

# What each kind of model learns from: the data task its sources must serve.
TASKS: dict[str, Task] = {"classifier": "classification", "clip": "image_text", "cappa": "image_text"}


@dataclass(frozen=True)
class Experiment:
    """A checked config with its resolved parts."""

    cfg: Config
    model: ModelSpec  # the model, resolved once
    source: str  # the registered data source that reads cfg.data (data.sources.SOURCES)

    @property
    def task(self) -> Task:
        return TASKS[self.model.kind]


def load_experiment(path: str | Path | None = None, overrides: list[str] = ()) -> Experiment:
    """Load, resolve and check an experiment (see the module docstring).

    Args:
        path: a YAML file or a shipped config's name, or None for the built-in defaults.
        overrides: ``key.sub=value`` strings, applied in order.

    Raises:
        ConfigError: naming the key, its value and the fix.
    """
    return resolve(load_config(path, overrides))


def resolve(cfg: Config) -> Experiment:
    """``cfg`` (already checked by ``load_config``) resolved and checked against the model and the data."""
    model = resolve_model(cfg.model, cfg.data.image_size, cfg.data.num_classes, cfg.train.loss, cfg.train.objective)
    task = TASKS[model.kind]
    name = source_name(cfg, task)
    source = source_class(name)
    source.check(cfg)
    check_render(cfg, name)
    if source.task != task:
        raise ConfigError(f"data.source={cfg.data.source} yields image-text pairs for a CLIP; model.name="
                          f"{cfg.model.name} is a classifier (use a clip_* model, or synthetic / shard data)")
    check_evaluation_data(cfg)
    check_classes(cfg.data.test, "data.test", cfg.data.num_classes)
    _check_eval(cfg, model)
    _check_finetune(cfg, model)
    check_layout(model, cfg.parallel.tensor, cfg.parallel.pipe)
    check_sparsity(model, cfg.model.sparsity.pattern, cfg.parallel.tensor)
    if cfg.data.packing.seq_len:
        _check_packing(cfg, model)
    return Experiment(cfg, model, name)


def _check_eval(cfg: Config, model: ModelSpec) -> None:
    e, clip = cfg.eval, model.kind == "clip"
    if e.every and model.kind == "cappa":
        raise ConfigError(f"eval.every={e.every}: {model.name} has no text tower for zero-shot / retrieval; set "
                          "eval.every=0 and evaluate its image tower after training (vitscale-export RUN --to timm)")
    if e.every and not clip and not cfg.data.test:
        raise ConfigError(f"eval.every={e.every} evaluates a classifier on its test split: set data.test (digits, "
                          "an image folder or labelled shards)")
    if e.every and clip and not (e.zeroshot or e.retrieval):
        raise ConfigError(f"eval.every={e.every} but there is nothing to evaluate: set eval.zeroshot and / or "
                          "eval.retrieval")
    if (e.zeroshot or e.retrieval) and e.every and not clip:
        raise ConfigError("eval.zeroshot / eval.retrieval evaluate a CLIP; model.name is not a CLIP model")


def _check_finetune(cfg: Config, model: ModelSpec) -> None:
    d, p, clip = cfg.data, cfg.parallel, model.kind in ("clip", "cappa")
    if (d.mixup > 0 or d.cutmix > 0 or d.random_erasing or d.rand_augment) and (clip or d.packing.seq_len):
        raise ConfigError("data.rand_augment / random_erasing / mixup / cutmix fine-tune a ViT classifier on whole "
                          "images; turn them off for a CLIP or with data.packing")
    if cfg.optim.layer_decay < 1 and (p.pipe > 1 or clip):
        raise ConfigError("optim.layer_decay needs a ViT classifier with parallel.pipe=1 (the layer index comes "
                          "from the whole model's parameter names); set optim.layer_decay=1 or parallel.pipe=1")
    if d.test and (p.pipe > 1 or clip):
        raise ConfigError("data.test evaluates a ViT classifier's top-1 on whole models: it needs parallel.pipe=1 "
                          "(evaluate a pipeline run afterwards with vitscale-eval RUN --task linear-probe, or unset "
                          "data.test)")


def _check_packing(cfg: Config, model: ModelSpec) -> None:
    """NaViT packing (``data.packing``) needs a ViT that takes packed sequences of any grid."""
    pk, arch = cfg.data.packing, model.arch
    if model.kind != "classifier" or arch.pos_embed != "factorized" or arch.class_token or arch.global_pool != "avg":
        raise ConfigError("data.packing needs per-image average pooling and position embeddings that fit any grid: "
                          "set model.pos_embed=factorized model.class_token=false model.global_pool=avg")
    if arch.moe_blocks:
        raise ConfigError("data.packing with model.moe is not supported: Soft MoE slots would mix the images of a "
                          "packed sequence; set model.moe.blocks=0 or data.packing.seq_len=0")
    if pk.min_size and pk.min_size < arch.patch_size:
        raise ConfigError(f"data.packing.min_size={pk.min_size} is smaller than one patch ({arch.patch_size} px)")
    needed = round(arch.grid_size * arch.grid_size * (1 - pk.token_drop))
    if pk.seq_len < needed:
        raise ConfigError(f"data.packing.seq_len={pk.seq_len} cannot hold one {cfg.data.image_size} px image "
                          f"({needed} tokens after token_drop={pk.token_drop}); use data.packing.seq_len >= {needed}")
