"""Export: a run's checkpoint, of any layout, as one whole-model state dict in a file that timm,
open_clip or vitscale (``model.init``) loads. Reading the checkpoint is ``checkpoint.read_checkpoint``;
this module converts the names (``models.interop``) and writes, atomically."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vitscale.files import replacing
from vitscale.models.interop import FORMATS, convert_state_dict, library_config
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint

__all__ = ["ExportResult", "export_run", "write_state_dict"]

logger = logging.getLogger(__name__)


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


def _layout(cfg) -> str:
    p = cfg.parallel
    return f"pipe {p.pipe} x tensor {p.tensor}, ZeRO-{p.zero}"


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
    with replacing(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
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
    run = load_run(run_dir)
    cfg = run.cfg
    folder, step_n = find_checkpoint(run_dir, step)
    state = convert_state_dict(read_checkpoint(folder, run), to)
    metadata = {"format": "pt", "vitscale_model": cfg.model.name,
                "vitscale_model_kwargs": json.dumps(run.model.kwargs),
                "step": str(step_n), "names": to, f"{to}_config": json.dumps(library_config(run.model.meta(), to))}
    path = write_state_dict(state, out, metadata)
    return ExportResult(path=path, to=to, model=cfg.model.name, step=step_n, checkpoint=folder, layout=_layout(cfg),
                        tensors=len(state), parameters=sum(v.numel() for v in state.values()),
                        dtypes=sorted({str(v.dtype).replace("torch.", "") for v in state.values()}))
