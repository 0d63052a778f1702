"""A probe run in a subprocess by ``test_host_syncs.py``: one process trains a tiny ViT through the
training loop (``train.loop.train``) while every host read of a tensor's value made from vitscale's
code is recorded with the step it happened in: ``item``, ``tolist``, ``cpu``, ``numpy`` and the
conversions ``bool`` / ``float`` / ``int`` (each one waits for a GPU's queue). The reads of the
per-step agreement (``distributed.PendingPoll.result``) are recorded apart, with the step whose
poll they read. Writes ``{"log_every", "steps", "reads": [[step, file:line, what]], "polls":
[[step, polled step]]}`` as JSON to argv[1]; argv[2] is the run folder."""
import json
import logging
import sys
from pathlib import Path

import torch

import vitscale
from vitscale.distributed import PendingPoll, StopRequest, init_distributed, shutdown
from vitscale.train.loop import train
from vitscale.train.setup import plan_run, start_run

PACKAGE = str(Path(vitscale.__file__).parent)
DATA = str(Path(vitscale.__file__).parent / "data")  # the loader's host-side code (a worker process in real runs)
STEPS, LOG_EVERY = 6, 3
READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


def main(out: str, run_dir: str) -> None:
    logging.basicConfig(level=logging.INFO)  # the start-up lines (the speed choices) go to stderr
    plan = plan_run("configs/vit_tiny.yaml", [
        "model.depth=2", "data.image_size=32", "train.micro_batch=4", "train.global_batch=8",  # 2 micro-batches
        f"train.steps={STEPS}", f"log.every={LOG_EVERY}", "log.warmup_steps=1", "log.progress=false",
        "log.preview=false", "data.num_workers=0", "parallel.zero=1", "checkpoint.every=0", "checkpoint.at_end=false",
        "checkpoint.resume=never", f"run.dir={run_dir}"], world_size=1)
    dims = init_distributed()
    run = start_run(plan, dims)
    current = {"step": 0}
    reads, polls = [], []
    start_step = run.meter.start_step

    def counted_start():
        current["step"] = run.engine.global_steps + 1
        start_step()

    run.meter.start_step = counted_start

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            in_poll = path.endswith("distributed.py") and caller.f_code.co_name == "result"
            if path.startswith(PACKAGE) and not path.startswith(DATA) and not in_poll and current["step"]:
                reads.append([current["step"], f"{path[len(PACKAGE) + 1:]}:{caller.f_lineno}", name])
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    start_poll, result = StopRequest.start_poll, PendingPoll.result

    def tagged_start(self, *args):
        pending = start_poll(self, *args)
        pending.polled_step = current["step"]
        return pending

    def watched_result(self):
        if getattr(self, "polled_step", None) is not None:
            polls.append([current["step"], self.polled_step])
        return result(self)

    StopRequest.start_poll, PendingPoll.result = tagged_start, watched_result
    train(run)
    Path(out).write_text(json.dumps({"log_every": LOG_EVERY, "steps": STEPS, "reads": reads, "polls": polls}))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
