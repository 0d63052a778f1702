"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (timm-style names)."""
from __future__ import annotations

from torch import nn

from vitscale.registry import Registry

MODELS: Registry[nn.Module] = Registry("model", "list_models()")


def register_model(name: str):
    """Decorator registering ``fn(**overrides) -> nn.Module`` under ``name``."""
    return MODELS.register(name)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"vit_*_patch16"``)."""
    return MODELS.names(pattern)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: e.g. ``vit_base_patch16``; ``list_models()`` lists them.
        overrides: architecture options, e.g. ``img_size=64, num_classes=10, depth=4``.

    Returns:
        The model, initialised from torch's current RNG state.
    """
    return MODELS.build(name, **overrides)
