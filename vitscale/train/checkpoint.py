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

Reading a checkpoint of any layout back into one whole-model state dict (``read_checkpoint``,
for export, evaluation, ``model.init`` and resharding) lives here too. What DeepSpeed 0.19.8
writes into a checkpoint folder (t = tensor rank, d = data rank, s = pipe x tensor
model-parallel rank, L = pipeline layer index):

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
import random
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vitscale.config import load_config
from vitscale.experiment import Experiment, resolve
from vitscale.files import write_text_atomic
from vitscale.models.interop import check_state_dict, merge_tensor_parallel, pipeline_to_whole
from vitscale.models.parallelize import layer_prefixes
from vitscale.models.tensor_parallel import parallelize_vit

logger = logging.getLogger(__name__)

MARKER = "vitscale.json"  # written last, by global rank 0, once every rank's files are complete


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``, oldest first."""
    return sorted(p for p in root.glob("step*") if p.is_dir() and is_complete(p))


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
            write_text_atomic(folder / MARKER, json.dumps({"step": step, "samples": samples, "layout": layout,
                                                      "world_size": dist.get_world_size()}) + "\n")
            write_text_atomic(root / "latest", folder.name)  # DeepSpeed's name for the newest tag
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
        layout: this run's layout; a checkpoint of another layout raises ``LayoutChange``
            (``vitscale.train.reshard`` takes it from there).

    Returns:
        The step to continue from (0 when starting fresh) and the client state saved with
        it ({} when starting fresh).
    """
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


def client_state(folder: Path) -> dict:
    """The client state DeepSpeed stored beside the model (in every ``*mp_rank_00_model_states.pt``)."""
    path = next(iter(sorted(folder.glob("*mp_rank_00_model_states.pt"))), None)
    return torch.load(path, map_location="cpu", weights_only=True) if path is not None else {}


# -- reading a checkpoint of any layout -------------------------------------------------------------

_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO3_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")

# Keys of config.yaml that only say where the run's data and starting weights were, or how
# to resume: the model and layout do not depend on them, and they need not exist where
# the export runs.
_PATHS_NEUTRAL = ["checkpoint.resume=never", "model.init=null", "data.source=gratings", "data.shards=null",
                  "data.params={}", "data.test=null", "eval.every=0"]


def load_run(run_dir: str | Path) -> Experiment:
    """The experiment of a run folder (``RUN_DIR/config.yaml``, the resolved config the run wrote), for
    its model and layout; where its data was need not exist here."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: RUN_DIR must be a run folder (run.dir of a training run)")
    return resolve(load_config(path, _PATHS_NEUTRAL))


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


def _meta_model(run: Experiment, tensor: int = 1) -> nn.Module:
    model = run.model.meta()
    if tensor > 1:  # rank 0's structure: every rank's shard has the same shapes
        parallelize_vit(model, rank=0, world=tensor, group=None)
    return model


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_ranks(ranks, what: str, tensor: int, folder: Path) -> None:
    if sorted(ranks) != list(range(tensor)):
        raise ValueError(f"{folder}: found {what} for tensor ranks {sorted(ranks)}, but config.yaml says "
                         f"parallel.tensor={tensor}; is the checkpoint complete?")


def _read_pipeline(folder: Path, run: Experiment, tensor: int) -> list[dict]:
    layers: dict[int, dict[int, Path]] = defaultdict(dict)  # tensor rank -> layer -> file
    for path in folder.iterdir():
        m = _LAYER_FILE.match(path.name)
        if m:
            layers[int(m.group(2) or 0)][int(m.group(1))] = path
    prefixes = layer_prefixes(run.model)
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


def read_checkpoint(folder: str | Path, run: Experiment) -> dict[str, torch.Tensor]:
    """One checkpoint folder of any layout -> the whole model's state dict, our names.

    The layout is read from the files (see the module docstring) and checked against
    ``cfg.parallel``; tensor-parallel shards are merged and pipeline layers renamed.

    Args:
        folder: ``run.dir/checkpoints/stepNNNNNNNN``.
        run: the run's experiment (``load_run``): model and layout.

    Returns:
        A state dict that the whole model (``run.model.create()``) loads with ``strict=True``: fp32 for ZeRO-3 (DeepSpeed's master weights), the training dtype
        otherwise.
    """
    folder = Path(folder)
    names = [p.name for p in folder.iterdir()]
    tensor = run.cfg.parallel.tensor
    if any(_LAYER_FILE.match(n) for n in names):
        shards = _read_pipeline(folder, run, tensor)
    elif any(_ZERO3_FILE.fullmatch(n) for n in names):
        shards = _read_zero3(folder, tensor)
    elif any(_MP_FILE.fullmatch(n) for n in names):
        shards = _read_module(folder, tensor)
    else:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states (*model_states.pt)")
    state = merge_tensor_parallel(shards, _meta_model(run, tensor)) if tensor > 1 else shards[0]
    check_state_dict(state, run.model.meta(), f"the checkpoint {folder}")
    return state
