"""Export: a run's checkpoint, of any layout, as one whole-model state dict in a file that timm,
open_clip or vitscale (``model.init``) loads, or as a folder in the layout timm's and open_clip's
``local-dir:`` loaders open with one call (weights, architecture, preprocessing, tokenizer).
Reading the checkpoint is ``checkpoint.read_checkpoint``; this module converts the names
(``models.interop``) and writes, atomically (a folder: written beside, then renamed into place).

    timm folder:      model.safetensors + config.json (timm's hub layout: architecture, num_classes,
                      model_args, pretrained_cfg with input size, mean / std, interpolation, crop)
    open_clip folder: open_clip_model.safetensors + open_clip_config.json (model_cfg, preprocess_cfg;
                      the text config names the tokenizer: ``data.captions.CaptionTokenizer.open_clip_tokens``)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vitscale.data.captions import CaptionTokenizer
from vitscale.files import replacing, replacing_folder
from vitscale.models.interop import FORMATS, convert_state_dict, library_config
from vitscale.progress import progress_bar
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint
from vitscale.train.safe_load import watching_reads

__all__ = ["ExportResult", "export_run", "write_state_dict", "is_folder", "timm_folder_config",
           "open_clip_folder_config", "FOLDER_FILES"]

# What each folder format holds: (weights file, config file), the names timm's and open_clip's
# local-dir loaders look for first.
FOLDER_FILES = {"timm": ("model.safetensors", "config.json"),
                "open_clip": ("open_clip_model.safetensors", "open_clip_config.json")}
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

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


def is_folder(out: str | Path) -> bool:
    """Whether ``--out`` names a folder: an existing folder, or a name without a suffix."""
    out = Path(out)
    return out.is_dir() or out.suffix == ""


def _check_out(out: str | Path, to: str = "vitscale") -> Path:
    out = Path(out)
    if is_folder(out):
        if to not in FOLDER_FILES:
            raise ValueError(f"--out {out} is a folder: folders are for --to {' / '.join(FOLDER_FILES)}; "
                             f"--to {to} writes a .safetensors or .pt file")
        return out
    if out.suffix not in FILE_SUFFIXES:
        raise ValueError(f"--out {out}: give a .safetensors or .pt file, or a folder (a name without a suffix) "
                         "for --to timm / open_clip")
    return out


def _owned(state: dict[str, torch.Tensor], show: bool | None = None) -> dict[str, torch.Tensor]:
    # Own, contiguous tensors: safetensors refuses views that share storage (ZeRO's flat buffers).
    out = {}
    with progress_bar(len(state), "export: tensors", "tensor", show) as bar:
        for k, v in state.items():
            out[k] = v.detach().to("cpu").contiguous().clone()
            bar.update(1)
    return out


def write_state_dict(state: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str] | None = None,
                     show_progress: bool | None = None) -> Path:
    """Write ``state`` to ``out`` (``.safetensors`` or ``.pt``) atomically: a temporary file
    beside it, renamed over it only when complete."""
    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = _owned(state, show_progress)
    with replacing(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=metadata)
        else:
            torch.save(tensors, tmp)
    return out


def timm_folder_config(run, step: int) -> dict:
    """``config.json`` of a timm folder, in timm's hub layout (``timm.models._hub``'s
    ``load_model_config_from_path`` reads it): the architecture (a timm ViT name), ``model_args``
    that rebuild our model from it, and the ``pretrained_cfg`` with the input size and the
    mean / std the run trained with, timm's test transform (bicubic, crop 0.875, as our
    classifier evaluation, ``data.downstream.timm_transform``)."""
    model = run.model.meta()
    args = library_config(model, "timm")  # raises for options timm's ViT has not
    if "block_fn" in args or "norm_layer" in args:
        raise ValueError(f"timm's config.json cannot name {args.get('block_fn') or args.get('norm_layer')} (a "
                         "parallel block / bias-free norm / a CLIP-style tower's LayerNorm); export a .safetensors "
                         "file and build the model with "
                         "vitscale.models.interop.create_timm_model(metadata['timm_config'])")
    d, size = run.cfg.data, args["img_size"]
    pretrained = {"tag": f"vitscale_step{step}", "custom_load": False, "input_size": [args["in_chans"], size, size],
                  "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                  "mean": list(d.mean), "std": list(d.std), "num_classes": args["num_classes"], "pool_size": None,
                  "first_conv": "patch_embed.proj", "classifier": "head"}
    return {"architecture": _timm_architecture(run.cfg.model.name, size), "num_classes": args["num_classes"],
            "num_features": args["embed_dim"], "global_pool": args["global_pool"], "model_args": args,
            "pretrained_cfg": pretrained}


def _timm_architecture(name: str, size: int) -> str:
    """The timm ViT name closest to ours (vit_tiny_patch16 at 64 px -> vit_tiny_patch16_224); its
    defaults do not matter: ``model_args`` sets every architecture argument."""
    import timm

    for candidate in (f"{name}_{size}", f"{name}_224", "vit_base_patch16_224"):
        if timm.is_model(candidate):
            return candidate
    raise ValueError(f"timm has no ViT architecture for {name}")  # timm without vision_transformer


def open_clip_folder_config(run, step: int) -> tuple[dict, list[int] | None]:
    """(``open_clip_config.json`` of an open_clip folder, the token-embedding rows to take):
    ``model_cfg`` (``CLIP(**model_cfg)``: our towers; the text config names the tokenizer that
    gives our captions' features, ``CaptionTokenizer.open_clip_tokens``) and ``preprocess_cfg``
    (our image size and mean / std; the shorter side resized and centre-cropped, bilinear, as our
    CLIP evaluation)."""
    model_cfg = library_config(run.model.meta(), "open_clip")  # raises for image-tower options open_clip has not
    text = model_cfg["text_cfg"]
    text_cfg, rows = CaptionTokenizer(text["vocab_size"], text["context_length"]).open_clip_tokens()
    text.update(text_cfg)
    d = run.cfg.data
    preprocess = {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB", "mean": list(d.mean),
                  "std": list(d.std), "interpolation": "bilinear", "resize_mode": "shortest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
            "vitscale": {"model": run.cfg.model.name, "step": step}}, rows


def _read(folder: Path, run, show: bool | None) -> dict[str, torch.Tensor]:
    """``read_checkpoint`` with a bar over the bytes of the checkpoint's files as each is read."""
    sizes = {p.resolve(): p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix == ".pt"}
    seen: set[Path] = set()
    with progress_bar(sum(sizes.values()), "export: reading", "B", show, unit_scale=True, unit_divisor=1024) as bar:
        def read(path: Path) -> None:
            path = path.resolve()
            if path in sizes and path not in seen:
                seen.add(path)
                bar.update(sizes[path])

        with watching_reads(read):
            state = read_checkpoint(folder, run)
        bar.update(bar.total - bar.n)  # files of other data ranks' ZeRO-3 states are listed, not needed
    return state


def export_run(run_dir: str | Path, out: str | Path, to: str = "vitscale", step: int | str = "latest",
               show_progress: bool | None = None) -> ExportResult:
    """Export a run's checkpoint as one whole-model state dict for timm, open_clip or vitscale.

    Args:
        run_dir: the run folder (``config.yaml``, ``checkpoints/``).
        out: the file to write, ``.safetensors`` or ``.pt``; or, for ``timm`` / ``open_clip``, a
            folder (an existing one, or a name without a suffix) that the library opens with one
            call (module docstring; README "Export").
        to: ``timm`` (a ViT, or a CapPa's image tower), ``open_clip`` (a CLIP) or ``vitscale`` (our names; what
            ``model.init`` and ``interop.shard_state_dict`` read).
        step: a step number or ``"latest"``.
        show_progress: bars on stderr (reading the files, copying the tensors); None: where
            stderr is a terminal.

    Returns:
        What was written.
    """
    if to not in FORMATS:
        raise ValueError(f"--to {to}: use one of {', '.join(FORMATS)}")
    out = _check_out(out, to)  # before the (possibly long) read
    run = load_run(run_dir)
    cfg = run.cfg
    kind = run.model.kind
    if to == "timm" and kind == "clip":
        raise ValueError(f"{run_dir} holds a CLIP ({cfg.model.name}), not a ViT classifier: use --to open_clip")
    if to == "open_clip" and kind != "clip":
        raise ValueError(f"{run_dir} holds {cfg.model.name}, not a CLIP: use --to timm")
    folder, step_n = find_checkpoint(run_dir, step)
    folder_config = rows = None
    if is_folder(out):  # the configs first: a model they cannot describe fails before the read
        folder_config, rows = ((timm_folder_config(run, step_n), None) if to == "timm" else
                               open_clip_folder_config(run, step_n))
    state = convert_state_dict(_read(folder, run, show_progress), to, run.model.meta())
    metadata = {"format": "pt", "vitscale_model": cfg.model.name,
                "vitscale_model_kwargs": json.dumps(run.model.kwargs),
                "step": str(step_n), "names": to, f"{to}_config": json.dumps(library_config(run.model.meta(), to))}
    if folder_config is None:
        path = write_state_dict(state, out, metadata, show_progress)
    else:
        if rows is not None:  # open_clip's tokenizer numbers our caption words differently
            state["token_embedding.weight"] = state["token_embedding.weight"][torch.tensor(rows)]
        weights, config = FOLDER_FILES[to]
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = _owned(state, show_progress)
        with replacing_folder(out) as tmp:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / weights), metadata=metadata)
            (tmp / config).write_text(json.dumps(folder_config, indent=2) + "\n")
        path = out
    return ExportResult(path=path, to=to, model=cfg.model.name, step=step_n, checkpoint=folder, layout=_layout(cfg),
                        tensors=len(state), parameters=sum(v.numel() for v in state.values()),
                        dtypes=sorted({str(v.dtype).replace("torch.", "") for v in state.values()}))
