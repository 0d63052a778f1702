"""Starting weights for a run (``model.init``), loaded into any layout: what fine-tuning starts from.

Accepted weights: a state dict with our parameter names (a ``vitscale-export``; for a ViT
these are timm's, so a timm ``VisionTransformer`` checkpoint loads as is), an open_clip
CLIP checkpoint (converted with ``clip.from_open_clip_state_dict``), or a vitscale run /
checkpoint folder of any layout (merged with ``checkpoint.read_checkpoint``). Before loading,
a classifier head of another class count is dropped (the model keeps its freshly
initialised head) and a position embedding of another grid is resampled with timm's
``resample_abs_pos_embed`` (224 -> 384 px fine-tuning). The whole-model tensors are then
sliced to what this rank holds (``interop.shard_state_dict``), so the same file starts a
tensor shard or a pipeline stage. In a distributed run the weights are read once per node and
each rank takes only the tensors of its piece (``node_reads.read_once_per_node``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch
from torch import nn

from vitscale.models.clip import from_open_clip_state_dict
from vitscale.models.interop import shard_state_dict, whole_name
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint
from vitscale.train.node_reads import Overlay, read_once_per_node, shape_of
from vitscale.train.safe_load import load_file

logger = logging.getLogger(__name__)


HEAD_KEYS = ("head.weight", "head.bias")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors``, a torch file (``safe_load.load_file``: ``weights_only=True``, a file
    that holds anything but tensors and plain data is refused) or a vitscale run / checkpoint folder
    (its latest checkpoint, any layout, merged).

    Wrapped checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``) are unwrapped.
    """
    path = Path(path)
    if path.is_dir():
        return _read_run(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path))
    state = load_file(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.init={path}: expected a state dict, found {type(state).__name__}")
    return state


def _read_run(path: Path) -> dict[str, torch.Tensor]:
    run_dir = path if (path / "config.yaml").is_file() else path.parent.parent
    folder = find_checkpoint(run_dir)[0] if run_dir == path else path
    return {k: v.float() for k, v in read_checkpoint(folder, load_run(run_dir)).items()}


def adapt_state_dict(state: Mapping[str, torch.Tensor], whole: dict[str, torch.Size],
                     num_prefix_tokens: int = 1) -> MutableMapping[str, torch.Tensor | None]:
    """``state`` made to fit a model whose whole-model tensor shapes are ``whole``:
    a classifier head of another shape is dropped (the model keeps its own, new head), a
    learned position embedding of another grid is resampled with timm's
    ``resample_abs_pos_embed`` (bicubic, the ``num_prefix_tokens`` class-token positions
    kept as they are). A CLIP's ``logit_bias`` belongs to the loss it trains with (SigLIP's): weights
    without one start a SigLIP run from its own initial bias (open_clip's ``load_checkpoint`` adds
    one too), and a bias the model has no use for (a ``clip``-loss run) is left out. A dropped head
    or a missing bias is None in the result. Everything else is returned unchanged, so the strict
    load that follows still names any other mismatch. The result is an ``Overlay`` of the changes
    on ``state``: the tensors left as they are are not read (``state`` may be a lazy file)."""
    from timm.layers import resample_abs_pos_embed

    state = Overlay(state)
    for key in HEAD_KEYS:
        if key in whole and (key not in state or shape_of(state, key) != tuple(whole[key])):
            if key in state:
                logger.info("model.init: %s %s replaced by a new head %s", key, shape_of(state, key),
                            tuple(whole[key]))
            state[key] = None  # marker: keep the model's initialised tensor
    if "logit_bias" in whole and "logit_bias" not in state and "logit_scale" in state:
        logger.info("model.init: no logit_bias in the weights; the model's initial one is kept (SigLIP)")
        state["logit_bias"] = None
    if "logit_bias" in state and "logit_bias" not in whole:
        logger.info("model.init: the weights' logit_bias is left out: train.loss=clip has no logit bias")
        del state["logit_bias"]
    new = whole.get("pos_embed")
    old_shape = shape_of(state, "pos_embed") if "pos_embed" in state else None
    old = state["pos_embed"] if new is not None and old_shape is not None and old_shape != tuple(new) else None
    if old is not None and old.shape[-1] == new[-1]:
        grid_old, grid_new = _grid(old.shape[1] - num_prefix_tokens), _grid(new[1] - num_prefix_tokens)
        if grid_old and grid_new:
            state["pos_embed"] = resample_abs_pos_embed(old.float(), [grid_new] * 2, [grid_old] * 2,
                                                        num_prefix_tokens=num_prefix_tokens).to(old.dtype)
            logger.info("model.init: pos_embed resampled from a %dx%d to a %dx%d grid", grid_old, grid_old,
                        grid_new, grid_new)
    return state


def _grid(tokens: int) -> int | None:
    side = int(round(tokens ** 0.5))
    return side if side * side == tokens else None


def _is_open_clip(state: dict) -> bool:
    return any(k.startswith(("transformer.resblocks.", "visual.transformer.")) for k in state)


def _read_ours(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights at ``path`` under our names (an open_clip checkpoint converted)."""
    state = read_state_dict(path)
    return from_open_clip_state_dict(state) if _is_open_clip(state) else state


def load_initial_weights(model: nn.Module, path: str | Path, layer_prefixes: list[str] | None = None,
                         whole: nn.Module | None = None, dims=None) -> None:
    """Load ``path`` into ``model`` strictly, after ``adapt_state_dict`` (new head, resampled
    position embedding); any other mismatch raises, naming the keys and shapes to fix.

    Args:
        model: the whole model, a tensor shard of it, or a ``PipelineModule`` stage.
        path: the weights (see the module docstring).
        layer_prefixes: for a pipeline stage, each layer's name in the whole model.
        whole: the whole model (e.g. on the meta device) when ``model`` is a pipeline stage;
            its head and position-embedding shapes decide what is adapted.
        dims: this process's ``ParallelDims`` in a distributed run (collective: every rank calls
            it): the file is read once per node (``node_reads``); None: read here.
    """
    with read_once_per_node(lambda: _read_ours(path), dims, "model_init") as state:
        _load(model, state, path, layer_prefixes, whole)
    logger.info("initial weights from %s", path)


def _load(model: nn.Module, state: Mapping, path: str | Path, layer_prefixes: list[str] | None,
          whole: nn.Module | None) -> None:
    reference = whole if whole is not None else model
    cfg = getattr(reference, "cfg", None)
    whole_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    state = adapt_state_dict(state, whole_shapes, int(bool(getattr(cfg, "class_token", True))))
    # A new head (or bias) keeps the model's own initialised tensors: a placeholder of the whole shape
    # goes through the slicing, and this rank's own values replace it afterwards.
    new_head = {k for k, v in state.changed.items() if v is None}  # the Overlay's changes: nothing read
    state.update({k: torch.zeros(whole_shapes[k]) for k in new_head})
    if layer_prefixes is not None or any(hasattr(m, "shard") for m in model.modules()):
        try:
            state = shard_state_dict(state, model, layer_prefixes=layer_prefixes)
        except (KeyError, ValueError) as e:
            raise ValueError(f"model.init={path} does not fit the model: {e}. Check model.name and "
                             "data.image_size") from None
    own = model.state_dict()
    for key in own:
        if whole_name(key, "", layer_prefixes) in new_head:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {shape_of(state, k)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and shape_of(state, k) != tuple(own[k].shape)]
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
    model.load_state_dict(dict(state), strict=True)  # this rank's tensors only
