"""Save and resume through DeepSpeed's checkpoints (any ZeRO stage), atomically.

A checkpoint is ``run.dir/checkpoints/step{N:08d}/``: DeepSpeed's files (model,
optimizer, LR schedule, loss scaler), one ``rng_rank{R:05d}.pt`` per rank (torch, CUDA,
numpy and Python RNG states), and the marker ``vitscale.json`` (step, samples, layout).
The client state holds the step and the data position. Synthetic streams are a function
of the global sample position, shard streams are replayed to it
(``vitscale.data.synthetic_loader``); an image-text loader's position (per data rank:
each worker's epoch, batches and samples taken, its counters) is gathered from all ranks
into the client state (``vitscale.data.laion``). Either way a resumed run continues with
exactly the samples it would have seen.

Atomic: every rank writes its files, the ranks agree (all-reduce) that all of them
succeeded, and only then global rank 0 writes the marker and, after it, ``latest``. A
folder without the marker is incomplete (a rank died or a disk filled mid-save): resume
skips it and the next save removes it. A failed save (e.g. no space left) is logged with
the checkpoint that stays the one to resume from, and training goes on. A checkpoint
whose weights hold a NaN / Inf is never written.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

MARKER = "vitscale.json"  # written last, by global rank 0, once every rank's files are complete


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``, oldest first."""
    return sorted(p for p in root.glob("step*") if p.is_dir() and is_complete(p))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    """This process's RNG states as tensors and numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": pos, "numpy_gauss": [has_gauss, gauss], "python": torch.tensor(internal, dtype=torch.int64),
             "python_version": version, "python_gauss": py_gauss}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))


def weights_finite(engine) -> bool:
    """Whether this rank's parameters (its ZeRO-3 partition where it has one) are all finite."""
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)
        if local.numel() and not torch.isfinite(local).all():
            return False
    return True


def _all_ok(ok: bool, device) -> bool:
    """Collective: whether ``ok`` holds on every rank."""
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def save(engine, run_dir: str | Path, step: int, samples: int, keep: int, is_main: bool,
         extra: dict | None = None, layout: dict | None = None) -> Path | None:
    """Collective: every rank calls it.

    Args:
        engine: the DeepSpeed engine.
        run_dir: the run folder (``checkpoints/`` inside it).
        step, samples: optimizer steps and samples done.
        keep: complete checkpoints kept (0 = all).
        is_main: global rank 0 (writes the marker and ``latest``, prunes).
        extra: joins the client state (the same on every rank, e.g. the gathered loader positions).
        layout: the parallel layout, recorded in the marker (resume compares it).

    Returns:
        The checkpoint folder, or None when it was not written (non-finite weights, a
        failed write); the previous complete checkpoint then stays the one to resume from.
    """
    import torch.distributed as dist

    root = checkpoint_root(run_dir)
    folder = root / f"step{step:08d}"
    device = engine.device
    previous = complete_checkpoints(root)
    fallback = f"{previous[-1]} stays the latest complete checkpoint" if previous else "no complete checkpoint exists"
    if not _all_ok(weights_finite(engine), device):
        if is_main:
            logger.error("checkpoint at step %d not written: the weights hold NaN / Inf; %s", step, fallback)
        return None
    error = None
    try:
        engine.save_checkpoint(str(root), tag=folder.name, save_latest=False,
                               client_state={"step": step, "samples": samples, **(extra or {})})
        torch.save(_rng_state(), folder / f"rng_rank{dist.get_rank():05d}.pt")
    except (OSError, RuntimeError) as e:  # no space left, quota, I/O error
        error = e
        logger.error("rank %d: writing checkpoint %s failed: %s", dist.get_rank(), folder, e)
    if not _all_ok(error is None, device):
        if is_main:
            shutil.rmtree(folder, ignore_errors=True)
            logger.error("checkpoint %s FAILED and was removed (%s); %s; training goes on", folder,
                         error or "another rank failed to write", fallback)
        dist.barrier()
        return None
    if is_main:
        try:
            _write_atomic(folder / MARKER, json.dumps({"step": step, "samples": samples, "layout": layout,
                                                      "world_size": dist.get_world_size()}) + "\n")
            _write_atomic(root / "latest", folder.name)  # DeepSpeed's name for the newest tag
        except OSError as e:
            (folder / MARKER).unlink(missing_ok=True)
            logger.error("checkpoint %s FAILED: its marker could not be written (%s); %s", folder, e, fallback)
            folder = None
        else:
            logger.info("checkpoint %s", folder)
            _prune(root, keep)
    dist.barrier()
    return folder


def _prune(root: Path, keep: int) -> None:
    """Remove incomplete folders (failed or interrupted saves) and all but the newest
    ``keep`` complete checkpoints."""
    complete = complete_checkpoints(root)
    old = complete[:-keep] if keep > 0 else []
    incomplete = [p for p in root.glob("step*") if p.is_dir() and not is_complete(p)]
    for folder in old + incomplete:
        shutil.rmtree(folder, ignore_errors=True)


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint of ``run.dir`` (incomplete ones are skipped
    with a warning, whatever ``latest`` says). A path: that checkpoint folder, or a
    ``checkpoints`` folder (its newest complete one); an incomplete one is an error.
    """
    if resume == "never":
        return None
    path = checkpoint_root(run_dir) if resume == "auto" else Path(resume)
    if resume == "auto" or not path.name.startswith("step"):
        complete = complete_checkpoints(path)
        skipped = [p.name for p in path.glob("step*") if p.is_dir() and (not complete or p > complete[-1])
                   and not is_complete(p)]
        if skipped:
            logger.warning("skipping incomplete checkpoint(s) %s in %s (a save that did not finish)",
                           ", ".join(sorted(skipped)), path)
        if complete or resume == "auto":
            return complete[-1] if complete else None
        raise ValueError(f"checkpoint.resume={resume} holds no complete checkpoint (step*/{MARKER}); "
                         "pass a checkpoint folder, checkpoint.resume=auto or never")
    if not is_complete(path):
        others = complete_checkpoints(path.parent)
        raise ValueError(f"checkpoint.resume={resume} is incomplete (no {MARKER}: its save did not finish); "
                         f"resume from {others[-1] if others else 'another checkpoint'} or pass checkpoint.resume=never")
    return path


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def load(engine, run_dir: str | Path, resume: str, layout: dict | None = None) -> tuple[int, dict]:
    """Restore the engine and this rank's RNG states.

    Args:
        engine: the DeepSpeed engine.
        run_dir: the run folder.
        resume: ``checkpoint.resume`` (auto | never | a path).
        layout: this run's layout; a checkpoint of another layout raises (see ``vitscale.train.reshard``).

    Returns:
        The step to continue from (0 when starting fresh) and the client state saved with
        it ({} when starting fresh).
    """
    import torch.distributed as dist

    folder = find_resume(run_dir, resume)
    if folder is None:
        return 0, {}
    saved = read_marker(folder).get("layout")
    if layout is not None and saved is not None and saved != layout:
        raise LayoutChange(folder, saved, layout)
    path, client = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise RuntimeError(f"checkpoint {folder} could not be loaded; pass checkpoint.resume=never "
                           f"to start fresh or point checkpoint.resume at another checkpoint")
    rng = folder / f"rng_rank{dist.get_rank():05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    logger.info("resumed from %s at step %d", path, client["step"])
    return int(client["step"]), dict(client)


class LayoutChange(ValueError):
    """A checkpoint written in another parallel layout than this run's."""

    def __init__(self, folder: Path, saved: dict, layout: dict):
        self.folder, self.saved, self.layout = folder, saved, layout
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in layout.items() if saved.get(k) != v)
        super().__init__(f"checkpoint {folder} was written with another layout ({diff})")


def load_resharded(engine, folder: Path, cfg, dims) -> tuple[int, dict]:
    """Resume from a checkpoint of another layout (``checkpoint.reshard=weights``): the whole
    model is read from it (``vitscale.train.export.read_checkpoint``, any layout), sliced to
    this rank's shard / stage, loaded, and copied into the optimizer's fp32 master weights;
    the LR schedule and step counters move to the checkpoint's step. The optimizer moments
    (and an fp16 loss scale) start afresh. Every rank reads the whole model once.

    Returns:
        As ``load``: the step and the client state (step, samples, and the image-text loader
        positions where the data-parallel size is unchanged).
    """
    from vitscale.config import is_clip
    from vitscale.models.interop import shard_state_dict
    from vitscale.train.export import load_run_config, read_checkpoint

    marker = read_marker(folder)
    saved_cfg = load_run_config(folder.parent.parent)
    problem = _reshard_problem(cfg, folder, marker["layout"], dims.data)
    if problem:
        raise ValueError(problem)
    state = read_checkpoint(folder, saved_cfg)
    module, prefixes = engine.module, None
    if dims.pipe > 1:
        from vitscale.config import model_kwargs
        from vitscale.models import create_model
        from vitscale.models.pipeline import clip_layers, vit_layers

        with torch.device("meta"):
            whole = create_model(cfg.model.name, **model_kwargs(cfg))
        prefixes = [prefix for prefix, _ in (clip_layers(whole) if is_clip(cfg) else vit_layers(whole))]
    if prefixes is not None or any(hasattr(m, "shard") for m in module.modules()):
        state = shard_state_dict(state, module, layer_prefixes=prefixes)
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # ZeRO 1/2 and bf16 keep fp32 master weights of their own
        refresh()
    step = int(marker["step"])
    engine.global_steps, engine.global_samples = step, int(marker["samples"])
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()  # -> last_epoch = step, the lr of that step
    client = {"step": step, "samples": int(marker["samples"])}
    if marker["layout"]["data"] == dims.data:
        client.update({k: v for k, v in _client_state(folder).items() if k == "data"})
    logger.info("resumed from %s at step %d in another layout (%s -> %s): weights and LR schedule; the optimizer "
                "moments start afresh", folder, step, marker["layout"],
                {"pipe": dims.pipe, "tensor": dims.tensor, "data": dims.data, "zero": cfg.parallel.zero})
    return step, client


def _client_state(folder: Path) -> dict:
    """The client state DeepSpeed stored beside the model (in every ``*mp_rank_00_model_states.pt``)."""
    path = next(iter(sorted(folder.glob("*mp_rank_00_model_states.pt"))), None)
    return torch.load(path, map_location="cpu", weights_only=True) if path is not None else {}


def check_resume(cfg, layout: dict) -> None:
    """Before any process group starts: the checkpoint ``checkpoint.resume`` names is complete
    and was written in ``layout`` (pipe, tensor, data, zero), or ``checkpoint.reshard=weights``
    allows another one. Raises ValueError naming the fix."""
    folder = find_resume(cfg.run.dir, cfg.checkpoint.resume)
    saved = read_marker(folder).get("layout") if folder is not None else None
    if saved is None or saved == layout:
        return
    if cfg.checkpoint.reshard == "weights":
        problem = _reshard_problem(cfg, folder, saved, layout["data"])
        if problem:
            raise ValueError(problem)
        return
    raise ValueError(f"{LayoutChange(folder, saved, layout)}: set checkpoint.reshard=weights to continue with its "
                     "weights and LR schedule (the optimizer moments start afresh), or resume in the layout it was "
                     "written with")


def _reshard_problem(cfg, folder: Path, saved: dict, data: int) -> str | None:
    """Why a checkpoint of layout ``saved`` cannot be resharded into this run, or None."""
    if cfg.parallel.zero == 3:
        return (f"checkpoint.reshard=weights into parallel.zero=3 is not supported (its parameters are partitioned); "
                f"resume {folder} with parallel.zero 0-2, or in its own layout {saved}")
    if cfg.data.source == "laion" and saved["data"] != data:
        return (f"checkpoint {folder}: the image-text loader positions of {saved['data']} data ranks cannot be split "
                f"over {data}; resume with {saved['data']} data-parallel ranks")
    return None
