"""Train one config in several layouts inside one launch (one process group).

    deepspeed --num_gpus N tests/train/layouts.py CONFIG RUN_ROOT '<common overrides JSON>' '<layouts JSON>'

Layouts is a JSON object {name: [overrides]}; each trains to RUN_ROOT/name (or the run.dir
its overrides name, e.g. to resume an earlier layout's run) exactly as
``vitscale-train CONFIG overrides`` would (the same ``plan_run`` / ``start_run`` / ``train``), but
every layout after the first reuses the process group, so a test pays one start-up
(13-30 s on CPU) for many layouts instead of one each. A layout given as
{"overrides": [...], "call": "module:function"} is handed to ``function(run)`` in place of
``train(run)``: a test's probe that watches the real run (and trains it) on every rank.
"""
import importlib
import json
import sys
from pathlib import Path

from vitscale.distributed import init_distributed, shutdown
from vitscale.train.loop import train
from vitscale.train.setup import plan_run, start_run


def _runner(spec):
    """(overrides, the function that trains the started run) of one layout."""
    if isinstance(spec, list):
        return spec, train
    module, _, function = spec["call"].partition(":")
    # A script's own folder is on sys.path, the repository's root (where ``tests`` is) only under PYTHONPATH.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    return spec["overrides"], getattr(importlib.import_module(module), function)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    config, root, common, layouts = args[0], args[1], json.loads(args[2]), json.loads(args[3])
    for name, spec in layouts.items():
        overrides, run_it = _runner(spec)
        plan = plan_run(config, common + [f"run.dir={root}/{name}"] + overrides)  # a layout may name its run.dir
        dims = init_distributed(pipe=plan.layout.pipe, tensor=plan.layout.tensor)
        run_it(start_run(plan, dims))
    shutdown()  # leave together, and free DeepSpeed's shared-memory buffers


if __name__ == "__main__":
    main()
