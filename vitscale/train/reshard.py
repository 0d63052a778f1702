"""Resuming in another layout (``checkpoint.reshard=weights``): a checkpoint written with other
pipe / tensor / data ranks or another ZeRO stage continues with its weights and LR schedule, the
optimizer moments starting afresh; and the check, before any process starts, that a resume can
go ahead in this run's layout at all."""
from __future__ import annotations

import logging
from pathlib import Path

from vitscale.data.sources import source_class
from vitscale.experiment import Experiment
from vitscale.models.interop import shard_state_dict
from vitscale.models.parallelize import layer_prefixes
from vitscale.train.checkpoint import LayoutChange, client_state, find_resume, load_run, read_checkpoint, read_marker
from vitscale.train.node_reads import read_once_per_node
from vitscale.train.optim import set_master_

logger = logging.getLogger(__name__)


def check_resume(exp: Experiment, layout: dict) -> None:
    """Before any process group starts: the checkpoint ``checkpoint.resume`` names is complete
    and was written in ``layout`` (pipe, tensor, data, zero), or ``checkpoint.reshard=weights``
    allows another one. Raises ValueError naming the fix."""
    cfg = exp.cfg
    folder = find_resume(cfg.run.dir, cfg.checkpoint.resume)
    saved = read_marker(folder).get("layout") if folder is not None else None
    if saved is None or saved == layout:
        return
    if cfg.checkpoint.reshard == "weights":
        problem = _reshard_problem(exp, folder, saved, layout["data"])
        if problem:
            raise ValueError(problem)
        return
    raise ValueError(f"{LayoutChange(folder, saved, layout)}: set checkpoint.reshard=weights to continue with its "
                     "weights and LR schedule (the optimizer moments start afresh), or resume in the layout it was "
                     "written with")


def _reshard_problem(exp: Experiment, folder: Path, saved: dict, data: int) -> str | None:
    """Why a checkpoint of layout ``saved`` cannot be resharded into this run, or None."""
    if exp.cfg.parallel.zero == 3:
        return (f"checkpoint.reshard=weights into parallel.zero=3 is not supported (its parameters are partitioned); "
                f"resume {folder} with parallel.zero 0-2, or in its own layout {saved}")
    if source_class(exp.source).stateful and saved["data"] != data:
        return (f"checkpoint {folder}: the {exp.source} loader positions of {saved['data']} data ranks cannot be "
                f"split over {data}; resume with {saved['data']} data-parallel ranks")
    return None


def load_resharded(engine, folder: Path, exp: Experiment, dims) -> tuple[int, dict]:
    """Resume from a checkpoint of another layout: the whole model is read from it
    (``checkpoint.read_checkpoint``, any layout: the fp32 master weights of a bf16 / fp16 run), sliced
    to this rank's shard / stage, loaded into the module (in its dtype) and, as fp32, into the
    optimizer's master weights (``optim.set_master_``), so a bf16 run continues from its fp32 values,
    not from their bf16 rounding; the LR schedule and step counters move to the checkpoint's step.
    The optimizer moments (and an fp16 loss scale) start afresh. The checkpoint is read once per node
    and each rank takes only its piece's tensors (``node_reads.read_once_per_node``).

    Returns:
        As ``checkpoint.load``: the step and the client state (step, samples, and the data
        loader positions where the data-parallel size is unchanged).
    """
    marker = read_marker(folder)
    problem = _reshard_problem(exp, folder, marker["layout"], dims.data)
    if problem:
        raise ValueError(problem)
    module = engine.module
    prefixes = layer_prefixes(exp.model) if dims.pipe > 1 else None
    with read_once_per_node(lambda: read_checkpoint(folder, load_run(folder.parent.parent)), dims, "reshard") as whole:
        if prefixes is not None or any(hasattr(m, "shard") for m in module.modules()):
            state = shard_state_dict(whole, module, layer_prefixes=prefixes)  # this rank's tensors only
        else:
            state = dict(whole)
        own = module.state_dict()
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
        for name, param in module.named_parameters():  # the master copies get the fp32 values themselves
            set_master_(engine.optimizer, param, state[name])
    step = int(marker["step"])
    engine.global_steps, engine.global_samples = step, int(marker["samples"])
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        engine.lr_scheduler.step()  # -> last_epoch = step, the lr of that step
    client = {"step": step, "samples": int(marker["samples"])}
    if marker["layout"]["data"] == dims.data:
        client.update({k: v for k, v in client_state(folder).items() if k == "data"})
    logger.info("resumed from %s at step %d in another layout (%s -> %s): weights and LR schedule; the optimizer "
                "moments start afresh", folder, step, marker["layout"],
                {"pipe": dims.pipe, "tensor": dims.tensor, "data": dims.data, "zero": exp.cfg.parallel.zero})
    return step, client
