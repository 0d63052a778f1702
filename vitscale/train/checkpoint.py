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
writes into a checkpoint folder (t = tensor rank, d = data rank, s = pipeline stage,
m = s x tensor + t the model-parallel rank, L = pipeline layer index):

    pipe = 1, ZeRO 0/1/2   mp_rank_{t:02d}_model_states.pt: the rank's whole module
                           (``"module"``: full tensors when tensor = 1, its shards otherwise,
                           in the training dtype) and ``"param_shapes"`` (the optimizer's
                           parameter order; None for ZeRO-0 fp16 / bf16), written by data rank 0
    pipe = 1, ZeRO 3       zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt (the module's
                           tensors are empty placeholders; its buffers; ``param_shapes``)
    pipe > 1 (ZeRO 0/1)    layer_{L:02d}-model_{t:02d}-model_states.pt: one state dict per
                           pipeline layer (keys relative to the layer) and tensor rank;
                           ``mp_rank_{m:02d}_model_states.pt`` carry ``module=None`` and the
                           stage's ``param_shapes`` (names ``"{L}.{key}"``)

and where the optimizer keeps its fp32 master weights when the module trains in bf16 / fp16
(or, ZeRO-3, holds only placeholders):

    ZeRO 1/2, BF16_Optimizer          ``[bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt``:
    (bf16 ZeRO-1, bf16 pipelines)     ``single_partition_of_fp32_groups``, data rank d's slice of
                                      each parameter group's flat buffer, and
                                      ``param_slice_mappings``: where each parameter's piece lies
                                      in it (``param_shapes`` give the order too, where DeepSpeed
                                      records them: not for bf16 ZeRO-0 pipelines)
    ZeRO 3                            the same files: ``fp32_flat_groups``, each parameter split
                                      into ceil(numel / D)-element pieces, piece d on data rank d
    ZeRO 0 (fp16 / bf16 with pipe 1,  ``mp_rank_{m:02d}_model_states.pt``'s ``optimizer``:
    fp16 pipelines)                   ``fp32_groups_flat`` (one flat buffer per group) or, torch's
                                      Adam, ``fp32_groups`` (one tensor per parameter). DeepSpeed
                                      records no parameter order for this optimizer, so ``save``
                                      adds it to the client state (``MASTER_ORDER``); a checkpoint
                                      written before that is read from its module, with a warning

``read_checkpoint`` takes every parameter from the fp32 master where the module's copy is not it
(``train.precision`` bf16 / fp16, or ZeRO-3), in every layout, as DeepSpeed's
``zero_to_fp32`` does for the layouts it reads (one model-parallel rank, pipe = 1), and the
buffers from the module. Every file here, and every file ``engine.load_checkpoint`` reads on resume,
is read by ``safe_load.load_file``: ``torch.load(..., weights_only=True)`` with the few DeepSpeed
classes an optimizer state pickles (loss scaler, ZeRO stage, fragment address: plain data) allowed
by name, nothing else; a file that asks for more is refused before any of it is built
(``zero_to_fp32`` itself unpickles with ``weights_only=False``, so it is not used).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vitscale.config import load_config
from vitscale.experiment import Experiment, resolve
from vitscale.files import write_text_atomic
from vitscale.models.interop import check_state_dict, merge_tensor_parallel, pipeline_to_whole, whole_name
from vitscale.models.parallelize import layer_prefixes
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.train.optim import zero0_master_order
from vitscale.train.safe_load import load_file

logger = logging.getLogger(__name__)

MARKER = "vitscale.json"  # written last, by global rank 0, once every rank's files are complete
MASTER_ORDER = "fp32_master_order"  # client-state key: the ZeRO-0 fp16 / bf16 optimizer's parameter order


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
        order = zero0_master_order(engine.optimizer, engine.module)  # this rank's; DeepSpeed keeps none (optim.py)
        engine.save_checkpoint(str(root), tag=folder.name, save_latest=False,
                               client_state={"step": step, "samples": samples, **(extra or {}),
                                             **({MASTER_ORDER: order} if order is not None else {})})
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
        _set_rng_state(load_file(rng))
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
    return load_file(path) if path is not None else {}


# -- reading a checkpoint of any layout -------------------------------------------------------------

_LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO3_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

# Keys of config.yaml that only say where the run's data, starting weights and distillation teacher
# were, or how to resume: the model and layout do not depend on them, and they need not exist where
# the export runs.
_PATHS_NEUTRAL = ["checkpoint.resume=never", "model.init=null", "data.source=gratings", "data.shards=null",
                  "data.params={}", "data.test=null", "eval.every=0", "train.distill.teacher=null",
                  "train.distill.model=null"]


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
    return [pipeline_to_whole({i: load_file(p) for i, p in layers[t].items()}, prefixes) for t in range(tensor)]


def _read_module(folder: Path, tensor: int) -> list[dict]:
    files = {int(m.group(1)): p for p in folder.iterdir() if (m := _MP_FILE.fullmatch(p.name))}
    shards = []
    _check_ranks(files, "mp_rank_XX_model_states.pt files", tensor, folder)
    for path in (files[t] for t in range(tensor)):
        module = load_file(path).get("module")
        if module is None:
            raise ValueError(f"{path} holds no module; a pipeline checkpoint keeps its weights in layer_* files")
        shards.append(dict(module))
    return shards


def _read_zero3(folder: Path, tensor: int) -> list[dict]:
    """Each tensor rank's module states of a ZeRO-3 checkpoint: buffers, and empty placeholders
    for the parameters (``read_checkpoint`` puts the fp32 master in their place)."""
    ranks = {int(m.group(2)) for p in folder.iterdir() if (m := _ZERO3_FILE.fullmatch(p.name))}
    _check_ranks(ranks, "ZeRO-3 model-states files", tensor, folder)
    return [dict(load_file(folder / f"zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt")["module"]) for t in range(tensor)]


def _walk(flat: torch.Tensor, shapes: dict, paddings: list[int] | None, where: str) -> dict[str, torch.Tensor]:
    """The parameters ``shapes`` (name -> shape, in order) laid one after another in ``flat``, with
    ``paddings[i]`` elements after parameter i."""
    out, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        numel = math.prod(shape)
        if offset + numel > flat.numel():
            raise ValueError(f"{where}: the fp32 master weights end at {flat.numel()} elements, before {name} "
                             f"({tuple(shape)}) at {offset}; the optimizer states do not fit param_shapes")
        out[name] = flat[offset:offset + numel].view(tuple(shape)).clone()
        offset += numel + (paddings[i] if paddings else 0)
    return out


def _partition_count(state: dict, where: str) -> int:
    counts = state["partition_count"]
    counts = set(counts) if isinstance(counts, (list, tuple)) else {counts}
    if len(counts) != 1:
        raise ValueError(f"{where}: parameter groups partitioned over different data ranks {sorted(counts)}")
    return counts.pop()


def _master_from_optim_states(states: list[dict], shapes: list[dict], where: str) -> dict[str, torch.Tensor]:
    """One model-parallel rank's fp32 master weights from its data ranks' ZeRO / BF16_Optimizer states."""
    partitions = _partition_count(states[0], where)
    if partitions != len(states):
        raise ValueError(f"{where}: the optimizer states are partitioned over {partitions} data ranks but "
                         f"{len(states)} files were found; is the checkpoint complete?")
    out: dict[str, torch.Tensor] = {}
    if "fp32_flat_groups" in states[0]:  # ZeRO-3: every parameter split over the data ranks
        flats = [torch.cat([g.flatten() for g in s["fp32_flat_groups"]]) for s in states]
        offset = 0
        for name, shape in ((k, v) for group in shapes for k, v in group.items()):
            numel = math.prod(shape)
            piece = math.ceil(numel / partitions)
            if offset + piece > flats[0].numel():
                raise ValueError(f"{where}: the ZeRO-3 fp32 partitions end before {name}; they do not fit "
                                 "param_shapes")
            out[name] = torch.cat([f[offset:offset + piece] for f in flats])[:numel].view(tuple(shape)).clone()
            offset += piece
        if offset != flats[0].numel():
            raise ValueError(f"{where}: the ZeRO-3 fp32 partitions hold {flats[0].numel()} elements per data rank, "
                             f"param_shapes account for {offset}; they do not fit")
        return out
    if "param_slice_mappings" in states[0]:  # ZeRO 1/2, BF16_Optimizer: where each parameter's pieces are
        for g in range(len(states[0]["single_partition_of_fp32_groups"])):
            pieces: dict[str, list[torch.Tensor]] = defaultdict(list)
            for state in states:  # data rank order: a parameter's pieces follow each other
                partition = state["single_partition_of_fp32_groups"][g].flatten()
                for name, piece in state["param_slice_mappings"][g].items():
                    pieces[name].append(partition[piece.start:piece.start + piece.numel])
            out.update({name: torch.cat(parts).clone() for name, parts in pieces.items()})
        return out  # flat: read_checkpoint gives each the model's shape
    if shapes is None:
        raise ValueError(f"{where}: the optimizer states say neither where each parameter is (param_slice_mappings) "
                         "nor in which order (param_shapes)")
    paddings = states[0].get("param_alignment_paddings")
    for g, group in enumerate(shapes):  # data rank d holds a slice of each group's flat buffer
        flat = torch.cat([s["single_partition_of_fp32_groups"][g].flatten() for s in states])
        out.update(_walk(flat, group, paddings[g] if paddings else None, where))
        # Saved without the group's end padding; as zero_to_fp32, allow DeepSpeed's 2 x D alignment.
        used = sum(math.prod(shape) for shape in group.values()) + sum(paddings[g] if paddings else [])
        align = 2 * partitions
        if math.ceil(used / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"{where}: parameter group {g}'s fp32 partitions hold {flat.numel()} elements, "
                             f"param_shapes account for {used}; they do not fit")
    return out


def _master_from_model_states(state: dict, where: str) -> dict[str, torch.Tensor] | None:
    """The fp32 master weights of DeepSpeed's ZeRO-0 fp16 / bf16 optimizer (``FP16_Optimizer``), in the
    parameter order and shapes the checkpoint recorded (``MASTER_ORDER``); None for a checkpoint
    written before vitscale recorded them."""
    optimizer, order = state.get("optimizer") or {}, state.get(MASTER_ORDER)
    if "fp32_groups_flat" not in optimizer and "fp32_groups" not in optimizer:
        raise ValueError(f"{where} holds no fp32 master weights (fp32_groups_flat / fp32_groups): not a "
                         "checkpoint of DeepSpeed's ZeRO-0 fp16 / bf16 optimizer")
    if order is None:
        return None
    out: dict[str, torch.Tensor] = {}
    groups = optimizer.get("fp32_groups_flat") or optimizer["fp32_groups"]  # flat buffers, or one tensor each
    for group, params in zip(groups, order, strict=True):
        shapes = {name: tuple(shape) for name, shape in params}
        if torch.is_tensor(group):
            out.update(_walk(group.flatten(), shapes, None, where))
        else:
            out.update({name: t.view(shapes[name]).clone() for t, name in zip(group, shapes, strict=True)})
    return out


def _read_master(folder: Path, pipe: int, tensor: int, zero3: bool) -> list[dict[str, torch.Tensor]] | None:
    """The optimizer's fp32 master weights, one dict per model-parallel rank m = stage x tensor + t,
    keyed as that rank's module names its parameters (a pipeline stage: ``"{layer}.{key}"``); None
    where an older ZeRO-0 checkpoint does not say how its master is ordered."""
    files: dict[int, dict[int, Path]] = defaultdict(dict)  # m -> d -> optimizer-states file
    for path in folder.iterdir():
        if m := _OPTIM_FILE.fullmatch(path.name):
            files[int(m.group(2))][int(m.group(1))] = path
    masters = []
    for mp in range(pipe * tensor):
        where = f"{folder} (model-parallel rank {mp})"
        if files.get(mp):
            ranks = files[mp]
            if sorted(ranks) != list(range(len(ranks))):
                raise ValueError(f"{where}: optimizer states of data ranks {sorted(ranks)}; is the checkpoint "
                                 "complete?")
            model_file = f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if zero3 else \
                f"mp_rank_{mp:02d}_model_states.pt"
            shapes = load_file(folder / model_file).get("param_shapes")  # None where DeepSpeed records no order
            states = [load_file(ranks[d], mmap=True)["optimizer_state_dict"] for d in sorted(ranks)]
            masters.append(_master_from_optim_states(states, shapes, where))
        else:
            master = _master_from_model_states(load_file(folder / f"mp_rank_{mp:02d}_model_states.pt"), where)
            if master is None:
                logger.warning("%s: written before checkpoints recorded the order of the ZeRO-0 optimizer's fp32 "
                               "master weights; reading the module's %s weights instead", where, "low-precision")
                return None
            masters.append(master)
    return masters


def _with_master(shards: list[dict], masters: list[dict], run: Experiment, tensor: int, folder: Path) -> list[dict]:
    """Each tensor rank's state dict with every parameter replaced by its fp32 master value."""
    pipe = len(masters) // tensor
    prefixes = layer_prefixes(run.model) if pipe > 1 else None
    params = {name: p.shape for name, p in _meta_model(run, tensor).named_parameters()}  # a tensor rank's shapes
    out = []
    for t, shard in enumerate(shards):
        master = {}
        for stage in range(pipe):
            master.update({whole_name(k, "", prefixes): v for k, v in masters[stage * tensor + t].items()})
        missing, unexpected = sorted(set(params) - set(master)), sorted(set(master) - set(params))
        wrong = [f"{k}: {v.numel()} elements for {tuple(params[k])}" for k, v in master.items()
                 if k in params and v.numel() != params[k].numel()]
        if missing or unexpected or wrong:
            raise ValueError(f"{folder}: the fp32 master weights of tensor rank {t} do not fit the model: no master "
                             f"for {missing[:5]}, unknown {unexpected[:5]}, sizes {wrong[:3]}")
        out.append({**shard, **{k: v.detach().reshape(params[k]) for k, v in master.items()}})  # saved with grad
    return out


def read_checkpoint(folder: str | Path, run: Experiment) -> dict[str, torch.Tensor]:
    """One checkpoint folder of any layout -> the whole model's state dict, our names.

    The layout is read from the files (see the module docstring) and checked against
    ``cfg.parallel``; tensor-parallel shards are merged and pipeline layers renamed.

    Args:
        folder: ``run.dir/checkpoints/stepNNNNNNNN``.
        run: the run's experiment (``load_run``): model and layout.

    Returns:
        A state dict that the whole model (``run.model.create()``) loads with ``strict=True``: the
        optimizer's fp32 master weights where the module's copy is not them (bf16 / fp16 training,
        ZeRO-3; see the module docstring), in any layout; the module's fp32 weights otherwise.
    """
    folder = Path(folder)
    names = [p.name for p in folder.iterdir()]
    tensor, pipe = run.cfg.parallel.tensor, run.cfg.parallel.pipe
    zero3 = any(_ZERO3_FILE.fullmatch(n) for n in names)
    if any(_LAYER_FILE.match(n) for n in names):
        shards = _read_pipeline(folder, run, tensor)
    elif zero3:
        shards = _read_zero3(folder, tensor)
    elif any(_MP_FILE.fullmatch(n) for n in names):
        shards = _read_module(folder, tensor)
    else:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states (*model_states.pt)")
    if zero3 or run.cfg.train.precision != "fp32":
        masters = _read_master(folder, pipe, tensor, zero3)
        if masters is not None:
            shards = _with_master(shards, masters, run, tensor, folder)
    state = merge_tensor_parallel(shards, _meta_model(run, tensor)) if tensor > 1 else shards[0]
    check_state_dict(state, run.model.meta(), f"the checkpoint {folder}")
    return state
