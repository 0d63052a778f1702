"""``vitscale-export RUN_DIR [--step N|latest] --to timm|open_clip|vitscale --out FILE|DIR``

Writes a run's checkpoint, whatever its layout (ZeRO 0-3, tensor and pipeline
parallel), as one whole-model state dict, or as a folder the library opens in one call:

    vitscale-export runs/vit_tiny --to timm --out vit_tiny       # timm.create_model("local-dir:vit_tiny", ...)
    vitscale-export runs/clip_tiny --to open_clip --out clip_tiny  # open_clip...("local-dir:clip_tiny")
    vitscale-export runs/vit_tiny --to timm --out vit_tiny.safetensors
    vitscale-export runs/b16 --step 20000 --to vitscale --out b16_step20000.pt   # for model.init

``--out`` is a folder when it exists as one or has no suffix (``vitscale.train.export``: the
folder layouts), else a ``.safetensors`` / ``.pt`` file.

``timm``: load with ``timm.create_model(<name>, pretrained=False, ...)`` or
``timm.models.vision_transformer.VisionTransformer(**kwargs)`` (a .safetensors file's
metadata ``timm_config`` holds those kwargs) and ``load_state_dict(..., strict=True)``; with
parallel blocks or bias-free norms (ViT-22B's recipe) build it with
``vitscale.models.interop.create_timm_model(kwargs)``, which resolves ``block_fn`` / ``norm_layer``.
Dual PatchNorm, Soft MoE and factorized positions have no timm equivalent: export those ``--to vitscale``.
``open_clip``: a CLIP's weights under open_clip's names (``open_clip_config`` in the
metadata is the model-config JSON). ``vitscale``: our names.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vitscale.models.interop import FORMATS
from vitscale.progress import add_progress_flags

logger = logging.getLogger("vitscale.export")


def _step(text: str) -> int | str:
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--step {text}: give a step number or 'latest'") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitscale-export", description="Export a run's checkpoint (any parallel layout) "
                                "as one whole-model state dict for timm, open_clip or vitscale.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (config.yaml, checkpoints/)")
    p.add_argument("--step", type=_step, default="latest", help="checkpoint step number, or 'latest' (default)")
    p.add_argument("--to", required=True, choices=FORMATS,
                   help="timm (ViT), open_clip (CLIP), or vitscale (our names, for model.init)")
    p.add_argument("--out", required=True, help="a .safetensors or .pt file, or a folder (exists, or a name without a "
                   "suffix) in timm's / open_clip's local-dir layout (--to timm / open_clip)")
    add_progress_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from vitscale.train.export import export_run  # after parsing: --help stays instant

    try:
        result = export_run(args.run_dir, args.out, to=args.to, step=args.step, show_progress=args.progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        logger.error("vitscale-export: %s", e)
        return 2
    logger.info("%s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
