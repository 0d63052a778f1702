"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (timm-style names)."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering ``fn(**overrides) -> nn.Module`` under ``name``."""

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` filters with shell wildcards (``"vit_*_patch16"``)."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
        name: e.g. ``vit_base_patch16``; ``list_models()`` lists them.
        overrides: architecture options, e.g. ``img_size=64, num_classes=10, depth=4``.

    Returns:
        The model, initialised from torch's current RNG state.
    """
    if name not in _MODELS:
        near = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        raise ValueError(f"unknown model '{name}'" + (f"; did you mean {', '.join(near)}?" if near else "")
                         + " (list_models() shows all)")
    return _MODELS[name](**overrides)
