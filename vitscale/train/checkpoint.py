"""Save and resume through DeepSpeed's checkpoints (any ZeRO stage).

A checkpoint is ``run.dir/checkpoints/step{N:08d}/`` plus DeepSpeed's ``latest`` file,
which DeepSpeed rewrites only after the tag folder is complete. Beside the model,
optimizer, LR schedule and loss scaler (DeepSpeed's part), the client state holds the
step and the data position; the data stream is a function of the global sample
position (``vitscale.data.synthetic_loader``), so a resumed run continues with exactly
the samples it would have seen.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(engine, run_dir: str | Path, step: int, samples: int, keep: int, is_main: bool) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    import torch.distributed as dist

    root = checkpoint_root(run_dir)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step, "samples": samples})
    dist.barrier()
    if is_main and keep > 0:
        tags = sorted(p for p in root.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if is_main:
        logger.info("checkpoint %s", root / tag)
    return root / tag


def find_resume(run_dir: str | Path, resume: str) -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        root = checkpoint_root(run_dir)
        latest = root / "latest"
        if not latest.is_file():
            return None
        return root, latest.read_text().strip()
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    return path.parent, path.name


def load(engine, run_dir: str | Path, resume: str) -> int:
    """Restore the engine; returns the step to continue from (0 when starting fresh)."""
    found = find_resume(run_dir, resume)
    if found is None:
        return 0
    load_dir, tag = found
    path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {load_dir / tag} could not be loaded; pass checkpoint.resume=never "
                           f"to start fresh or point checkpoint.resume at another checkpoint")
    logger.info("resumed from %s at step %d", path, client["step"])
    return int(client["step"])
