"""A run's DeepSpeed checkpoint, of any layout, -> one whole-model state dict -> a file.

What DeepSpeed 0.19.8 writes into ``run.dir/checkpoints/stepNNNNNNNN/`` (t = tensor
rank, d = data rank, s = pipe x tensor model-parallel rank, L = pipeline layer index):

    pipe = 1, ZeRO 0/1/2   mp_rank_{t:02d}_model_states.pt: the rank's whole module
                           (``"module"``: full tensors when tensor = 1, its shards otherwise,
                           in the training dtype), written by data rank 0; beside it
                           the optimizer's ``zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt``
    pipe = 1, ZeRO 3       zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt (the module's
                           tensors are empty placeholders) and ``..._optim_states.pt``
                           holding each data rank's flat fp32 partition
    pipe > 1 (ZeRO 0/1)    layer_{L:02d}-model_{t:02d}-model_states.pt: one state dict per
                           pipeline layer (keys relative to the layer) and tensor rank;
                           ``mp_rank_{s:02d}_model_states.pt`` only carry ``module=None``

ZeRO-3 is consolidated by DeepSpeed's own ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``.
That function globs every ``*_model_states.pt`` / ``*_optim_states.pt`` of the folder and
requires their count to equal the data-parallel partition count, so it refuses tensor > 1
(dp x tensor files); we therefore hand it one tensor rank at a time (a temporary folder
of links to that rank's files) and merge the ranks' shards ourselves
(``interop.merge_tensor_parallel``). Everything else is read with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitscale.config import Config, load_config, model_kwargs
from vitscale.models import create_model
from vitscale.models.clip import CLIP
from vitscale.models.interop import (FORMATS, check_state_dict, convert_state_dict, library_config,
                                     merge_tensor_parallel, pipeline_to_whole)
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.models.vit import VisionTransformer
from vitscale.train.checkpoint import checkpoint_root

__all__ = ["ExportResult", "load_run_config", "find_checkpoint", "read_checkpoint", "export_run", "write_state_dict"]

logger = logging.getLogger(__name__)

_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO3_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")

# Keys of config.yaml that only say where the run's data and starting weights were, or how
# to resume: the model and layout do not depend on them, and they need not exist where
# the export runs.
_PATHS_NEUTRAL = ["checkpoint.resume=never", "model.init=null", "data.source=gratings", "data.shards=null",
                  "data.params={}"]


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    path: Path  # the file
    to: str  # timm | open_clip | vitscale
    model: str  # model.name
    step: int  # the checkpoint's step
    checkpoint: Path  # the checkpoint folder read
    layout: str  # e.g. "pipe 2 x tensor 1, ZeRO-1"
    tensors: int  # entries in the state dict
    parameters: int  # elements in all of them
    dtypes: list[str]  # the tensors' dtypes

    def __str__(self) -> str:
        return (f"wrote {self.path} ({self.to} names): {self.tensors} tensors, {self.parameters:,} parameters "
                f"({', '.join(self.dtypes)}) of {self.model}, step {self.step}, from the {self.layout} "
                f"checkpoint {self.checkpoint}")


def load_run_config(run_dir: str | Path) -> Config:
    """``RUN_DIR/config.yaml`` (the resolved config the run wrote), for its model and layout."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a run folder (run.dir of a training run)")
    return load_config(path, _PATHS_NEUTRAL)


def find_checkpoint(run_dir: str | Path, step: int | str = "latest") -> tuple[Path, int]:
    """The checkpoint folder of ``step`` (an int, or ``"latest"`` as DeepSpeed's ``latest``
    file names it) and its step number."""
    root = checkpoint_root(run_dir)
    tags = sorted(p.name for p in root.glob("step*") if p.is_dir())
    if step == "latest":
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{root} has no 'latest' file: the run saved no checkpoint "
                                    f"(checkpoint.at_end / checkpoint.every); folders there: {tags or 'none'}")
        tag = latest.read_text().strip()
    else:
        tag = f"step{int(step):08d}"
    folder = root / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} does not exist; available: {', '.join(tags) or 'none'} "
                                f"(pass --step N or --step latest)")
    match = re.fullmatch(r"step(\d+)", tag)
    return folder, int(match.group(1)) if match else -1


def _meta_model(cfg: Config, tensor: int = 1) -> nn.Module:
    with torch.device("meta"):
        model = create_model(cfg.model.name, **model_kwargs(cfg))
    if tensor > 1:  # rank 0's structure: every rank's shard has the same shapes
        parallelize_vit(model, rank=0, world=tensor, group=None)
    return model


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _layer_prefixes(model: nn.Module) -> list[str]:
    """Each pipeline layer's name prefix in the whole model, in layer order: the same list
    of layers the training run's ``PipelineModule`` was built from."""
    from vitscale.models import pipeline

    if isinstance(model, VisionTransformer):
        return [prefix for prefix, _ in pipeline.vit_layers(model)]
    if isinstance(model, CLIP) and hasattr(pipeline, "clip_layers"):
        return [prefix for prefix, _ in pipeline.clip_layers(model)]
    raise ValueError(f"pipeline checkpoints of {type(model).__name__} cannot be exported: "
                     "vitscale.models.pipeline has no layer list for it")


def _check_ranks(ranks, what: str, tensor: int, folder: Path) -> None:
    if sorted(ranks) != list(range(tensor)):
        raise ValueError(f"{folder}: found {what} for tensor ranks {sorted(ranks)}, but config.yaml says "
                         f"parallel.tensor={tensor}; is the checkpoint complete?")


def _read_pipeline(folder: Path, cfg: Config, tensor: int) -> list[dict]:
    layers: dict[int, dict[int, Path]] = defaultdict(dict)  # tensor rank -> layer -> file
    for path in folder.iterdir():
        m = _LAYER_FILE.match(path.name)
        if m:
            layers[int(m.group(2) or 0)][int(m.group(1))] = path
    prefixes = _layer_prefixes(_meta_model(cfg))
    _check_ranks(layers, "pipeline layer files", tensor, folder)
    return [pipeline_to_whole({i: _load(p) for i, p in layers[t].items()}, prefixes) for t in range(tensor)]


def _read_module(folder: Path, tensor: int) -> list[dict]:
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _MP_FILE.fullmatch(p.name))}
    shards = []
    _check_ranks(files, "mp_rank_XX_model_states.pt files", tensor, folder)
    for path in (files[t] for t in range(tensor)):
        module = _load(path).get("module")
        if module is None:
            raise ValueError(f"{path} holds no module; a pipeline checkpoint keeps its weights in layer_* files")
        shards.append(dict(module))
    return shards


def _read_zero3(folder: Path, tensor: int) -> list[dict]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ranks = {int(m.group(2)) for p in folder.iterdir() if (m := _ZERO3_FILE.fullmatch(p.name))}
    _check_ranks(ranks, "ZeRO-3 model-states files", tensor, folder)
    shards = []
    for t in range(tensor):
        # zero_to_fp32 reads every *_model_states.pt / *_optim_states.pt of a folder and wants
        # one per data rank: show it only tensor rank t's (see the module docstring).
        with tempfile.TemporaryDirectory(prefix="vitscale-export-") as tmp:
            view = Path(tmp) / folder.name
            view.mkdir()
            for path in folder.iterdir():
                if f"mp_rank_{t:02d}_" in path.name and path.name.endswith(("_model_states.pt", "_optim_states.pt")):
                    (view / path.name).symlink_to(path.resolve())
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter):  # it prints its progress; keep our stdout clean
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=folder.name)
            logger.debug("zero_to_fp32 (tensor rank %d): %s", t, chatter.getvalue())
        shards.append(state)
    return shards


def _layout(cfg: Config) -> str:
    p = cfg.parallel
    return f"pipe {p.pipe} x tensor {p.tensor}, ZeRO-{p.zero}"


def read_checkpoint(folder: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """One checkpoint folder of any layout -> the whole model's state dict, our names.

    The layout is read from the files (see the module docstring) and checked against
    ``cfg.parallel``; tensor-parallel shards are merged and pipeline layers renamed.

    Args:
        folder: ``run.dir/checkpoints/stepNNNNNNNN``.
        cfg: the run's config (``load_run_config``): model and layout.

    Returns:
        A state dict that ``create_model(cfg.model.name, **model_kwargs(cfg))`` loads with
        ``strict=True``: fp32 for ZeRO-3 (DeepSpeed's master weights), the training dtype
        otherwise.
    """
    folder = Path(folder)
    names = [p.name for p in folder.iterdir()]
    tensor = cfg.parallel.tensor
    if any(_LAYER_FILE.match(n) for n in names):
        shards = _read_pipeline(folder, cfg, tensor)
    elif any(_ZERO3_FILE.fullmatch(n) for n in names):
        shards = _read_zero3(folder, tensor)
    elif any(_MP_FILE.fullmatch(n) for n in names):
        shards = _read_module(folder, tensor)
    else:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states (*model_states.pt)")
    state = merge_tensor_parallel(shards, _meta_model(cfg, tensor)) if tensor > 1 else shards[0]
    check_state_dict(state, _meta_model(cfg), f"the checkpoint {folder}")
    return state


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"--out {out}: give a .safetensors or .pt file")
    return out


def write_state_dict(state: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` to ``out`` (``.safetensors`` or ``.pt``) atomically: a temporary file
    beside it, renamed over it only when complete."""
    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Own, contiguous tensors: safetensors refuses views that share storage (ZeRO's flat buffers).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def export_run(run_dir: str | Path, out: str | Path, to: str = "vitscale", step: int | str = "latest") -> ExportResult:
    """Export a run's checkpoint as one whole-model state dict for timm, open_clip or vitscale.

    Args:
        run_dir: the run folder (``config.yaml``, ``checkpoints/``).
        out: the file to write, ``.safetensors`` or ``.pt``.
        to: ``timm`` (a ViT), ``open_clip`` (a CLIP) or ``vitscale`` (our names; what
            ``model.init`` and ``interop.shard_state_dict`` read).
        step: a step number or ``"latest"``.

    Returns:
        What was written.
    """
    if to not in FORMATS:
        raise ValueError(f"--to {to}: use one of {', '.join(FORMATS)}")
    _check_out(out)  # before the (possibly long) read
    cfg = load_run_config(run_dir)
    folder, step_n = find_checkpoint(run_dir, step)
    state = convert_state_dict(read_checkpoint(folder, cfg), to)
    metadata = {"format": "pt", "vitscale_model": cfg.model.name,
                "vitscale_model_kwargs": json.dumps(model_kwargs(cfg)),
                "step": str(step_n), "names": to, f"{to}_config": json.dumps(library_config(_meta_model(cfg), to))}
    path = write_state_dict(state, out, metadata)
    return ExportResult(path=path, to=to, model=cfg.model.name, step=step_n, checkpoint=folder, layout=_layout(cfg),
                        tensors=len(state), parameters=sum(v.numel() for v in state.values()),
                        dtypes=sorted({str(v.dtype).replace("torch.", "") for v in state.values()}))
