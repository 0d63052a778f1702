"""Starting weights for a run (``model.init``), into any layout.

Accepted: a state dict with our parameter names (a ``vitscale-export``; for a ViT these
are timm's, so a timm ``VisionTransformer`` checkpoint of the same shape loads as is) or
an open_clip CLIP checkpoint (converted with ``clip.from_open_clip_state_dict``). The
whole-model tensors are sliced to what this rank holds (``interop.shard_state_dict``),
so the same file starts a tensor shard or a pipeline stage. Head swapping and
position-embedding resizing belong to the fine-tuning work.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vitscale.models.clip import from_open_clip_state_dict
from vitscale.models.interop import shard_state_dict

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or a torch file (loaded with ``weights_only=True``).

    Wrapped checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``) are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.init={path}: expected a state dict, found {type(state).__name__}")
    return state


def _is_open_clip(state: dict) -> bool:
    return any(k.startswith(("transformer.resblocks.", "visual.transformer.")) for k in state)


def load_initial_weights(model: nn.Module, path: str | Path, layer_prefixes: list[str] | None = None) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the keys and shapes to fix.

    Args:
        model: the whole model, a tensor shard of it, or a ``PipelineModule`` stage.
        path: the weights (see the module docstring).
        layer_prefixes: for a pipeline stage, each layer's name in the whole model.
    """
    state = read_state_dict(path)
    if _is_open_clip(state):
        state = from_open_clip_state_dict(state)
    if layer_prefixes is not None or any(hasattr(m, "shard") for m in model.modules()):
        try:
            state = shard_state_dict(state, model, layer_prefixes=layer_prefixes)
        except (KeyError, ValueError) as e:
            raise ValueError(f"model.init={path} does not fit the model: {e}. Check model.name and "
                             "data.image_size") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise ValueError(f"model.init={path} does not fit the model: {'; '.join(parts)}. "
                         f"Check model.name, data.image_size and data.num_classes")
    model.load_state_dict(state, strict=True)
    logger.info("initial weights from %s", path)
