"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (timm-style names), and
each model's kind: ``classifier`` (images -> logits) or ``clip`` (images and captions -> joint
embeddings) or ``cappa`` (images and captions -> next-token logits: a CLIP size's image
tower with a text decoder, ``models/cappa.py``), which decides its loss, its data and its evaluation."""
from __future__ import annotations

from typing import Literal

from torch import nn

from vitscale.registry import Registry

MODELS: Registry[nn.Module] = Registry("model", "list_models()")

ModelKind = Literal["classifier", "clip", "cappa"]
KINDS: tuple[str, ...] = ("classifier", "clip", "cappa")


def register_model(name: str, kind: ModelKind = "classifier"):
    """Decorator registering ``fn(**overrides) -> nn.Module`` under ``name``, of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"model kind '{kind}' of {name}: use one of {', '.join(KINDS)}")
    return MODELS.register(name, kind=kind)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"vit_*_patch16"``)."""
    return MODELS.names(pattern)


def model_kind(name: str) -> ModelKind:
    """The registered kind of ``name`` (raises ValueError for an unknown name)."""
    return MODELS.info(name)["kind"]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: e.g. ``vit_base_patch16``; ``list_models()`` lists them.
        overrides: architecture options, e.g. ``img_size=64, num_classes=10, depth=4``.

    Returns:
        The model, initialised from torch's current RNG state.
    """
    return MODELS.build(name, **overrides)
