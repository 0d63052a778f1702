"""Throughput: samples/s globally and per node, TFLOP/s and MFU per device, data-wait fraction.

Every rank times its own steps, the time it waits for data and the time of its forward
passes. At each log interval the ranks exchange those few numbers (one small
all-gather), and global rank 0 writes one ``scope: global`` record and one ``scope:
node`` record per node, each computed from that node's own ranks. A single writer keeps
``metrics.jsonl`` free of concurrent appends from many nodes over a parallel file
system (and of one file per node), and the straggler figures need every node's numbers
in one place anyway.

Timing (issue 19): a step is timed between marks at its boundaries. On a GPU the marks are
CUDA events recorded on the current stream, so a step ends when the device has finished the
work queued for it (optimizer update, ZeRO all-gathers), not when the host has queued it; the
events are read at log steps (one wait for the last event there), so no synchronisation is
added per step. On the CPU the wall clock at those points is already synchronous. Consecutive
steps tile the device's timeline: the per-step times add up to the run's wall time, less what
happens between steps (checkpoints, evaluation, logging).

Per-node accounting: a node is credited with the work its own ranks did. Each rank does its
stage's share of the model's forward FLOPs (``parallelize.stage_flops``; all of it without a
pipeline), split over its tensor ranks, on its data rank's ``global_batch / data`` samples; a
node's samples are that work in sample-equivalents (sum over its ranks of ``global_batch / data
x stage share / tensor``), its FLOPs those samples x the model's FLOPs per sample. So every
layout (data, tensor, pipe, pipe x data, a pipeline spanning nodes) credits each sample to the
nodes exactly once, and the nodes' samples/s add up to the global figure (when their timed
spans agree, as they do in synchronous training).

Stragglers: in synchronous training every node's step takes as long as the slowest
node's, so step times cannot show which node is slow. A node's own pace is its forward
passes (``fwd_samples_per_s``: samples / forward seconds), which wait for no other node
under data parallelism with ZeRO 0-2 (as Megatron-LM's straggler detector times the
forward step). The global record names the slowest and fastest node by that pace,
the spread (max - min) / median, and warns about nodes below ``straggler_fraction`` of
the median. Pipelines time no forward of their own; there the pace is steps/s.

Like big_vision's ``Chrono``, the first ``warmup_steps`` are left out of the figures
(compilation, allocator and communicator warm-up), and checkpoints happen between
timed steps.

MFU = achieved model FLOP/s per device / peak FLOP/s per device, with model FLOPs
= 3 x forward FLOPs per sample (forward + backward, PaLM appendix B); HFU also counts
the recomputed forward of activation checkpointing (4 x).

A distillation teacher (``train/distill.py``) is counted apart: ``mfu``, ``hfu`` and
``tflops_per_device`` are the student's alone, and the records add the teacher's forward FLOPs per
sample (``teacher_flops_per_sample``), its FLOP/s per device (``teacher_tflops_per_device``: it runs
forward only, whole on each of ``teacher_copies`` tensor ranks) and ``mfu_with_teacher``, the
utilisation of student and teacher work together.
"""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

# bf16 dense peak TFLOP/s per device (vendor data sheets). MFU is reported against it.
PEAK_TFLOPS = {
    "A100": 312.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "V100": 125.0,  # fp16 tensor cores; V100 has no bf16
    "A800": 312.0,
    "H800": 989.0,
    "L40S": 362.0,
    "MI250X": 383.0,
    "MI300X": 1307.0,
}


def device_peak_tflops(device_name: str) -> float | None:
    """Peak bf16 TFLOP/s for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    best = None
    for key, value in PEAK_TFLOPS.items():  # the longest matching key wins ("H100 PCIe" over "H100")
        if key.lower() in device_name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


class ThroughputMeter:
    """Times steps and data waits on every rank; turns them into JSONL records.

    Args:
        dims: this process's ``ParallelDims``.
        global_batch: samples per optimizer step.
        flops_per_sample: forward FLOPs per sample (``vitscale.models.flops.forward_flops``).
        warmup_steps: steps at the start left out of the figures.
        peak_tflops: per-device peak for MFU, or None (then MFU is null).
        recompute: activation checkpointing recomputes the forward (counted in HFU only).
        info: constant fields added to every record (model, layout, batch sizes).
        straggler_fraction: warn about nodes whose pace is below this fraction of the median's; 0 = never.
        teacher_flops_per_sample: a distillation teacher's forward FLOPs per sample; 0 = none.
        teacher_copies: ranks that each run the whole teacher on one replica's samples (its tensor ranks).
    """

    def __init__(self, dims, global_batch: int, flops_per_sample: int, warmup_steps: int,
                 peak_tflops: float | None, recompute: bool = False, info: dict | None = None,
                 straggler_fraction: float = 0.8, stage_flops: list[int] | None = None,
                 teacher_flops_per_sample: int = 0, teacher_copies: int = 1):
        self.dims, self.global_batch = dims, global_batch
        self.teacher_flops_per_sample, self.teacher_copies = teacher_flops_per_sample, teacher_copies
        self.flops_per_sample, self.warmup_steps, self.peak_tflops = flops_per_sample, warmup_steps, peak_tflops
        stage_flops = list(stage_flops or [flops_per_sample])
        if len(stage_flops) != dims.pipe or min(stage_flops) < 0 or sum(stage_flops) <= 0:
            raise ValueError(f"stage_flops must hold one non-negative count per pipeline stage ({dims.pipe}); "
                             f"got {stage_flops}")
        self.stage_share = [f / sum(stage_flops) for f in stage_flops]  # each stage's fraction of a sample's work
        self.recompute, self.info, self.straggler_fraction = recompute, dict(info or {}), straggler_fraction
        self.steps_done = 0  # steps timed by this meter (after warm-up)
        self.elapsed_s = 0.0
        self.data_wait_s = 0.0
        self.forward_s = 0.0
        self._forward_events: list = []  # (start, end) CUDA events, read at the next records()
        self.step_times_s: list[float] = []
        self._cuda = dims.device.type == "cuda"
        self._step_start = None  # this step's start mark
        self._marks: list = []  # (start, end) marks of timed steps not yet read: CUDA events or perf_counter()s
        self._seen = 0

    def _mark(self):
        """A point on the device's timeline: a CUDA event recorded on the current stream (read later),
        or the wall clock on the CPU, where work is synchronous."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start_step(self) -> None:
        self._step_start = self._mark()

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self._seen >= self.warmup_steps:
            self.data_wait_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Times a forward pass (and loss); on a GPU with events, so no synchronisation is added."""
        if self._seen < self.warmup_steps:
            yield
        elif self.dims.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._forward_events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.forward_s += time.perf_counter() - t0

    def _forward_total_s(self) -> float:
        for start, end in self._forward_events:
            end.synchronize()
            self.forward_s += start.elapsed_time(end) / 1e3
        self._forward_events.clear()
        return self.forward_s

    def end_step(self) -> None:
        end = self._mark()
        self._seen += 1
        if self._seen > self.warmup_steps:
            self.steps_done += 1
            self._marks.append((self._step_start, end))

    def collect(self) -> None:
        """Read the marks of the steps timed since the last call into ``step_times_s`` and
        ``elapsed_s``. On a GPU this waits for the last step's work to finish (the one wait
        per log interval); ``records`` calls it."""
        if self._cuda and self._marks:
            self._marks[-1][1].synchronize()  # events complete in stream order: every earlier one is done too
        for start, end in self._marks:
            dt = start.elapsed_time(end) / 1e3 if self._cuda else end - start
            self.step_times_s.append(dt)
            self.elapsed_s += dt
        self._marks.clear()

    def records(self, step: int) -> list[dict]:
        """Collective: every rank must call it at the same step. Returns records on rank 0, else []."""
        import torch.distributed as dist

        d = self.dims
        self.collect()
        mine = torch.tensor([self.elapsed_s, self.data_wait_s, float(d.data_rank), self._forward_total_s(),
                             float(d.stage if d.pipe > 1 else 0)],
                            dtype=torch.float64, device=d.device)
        gathered = [torch.zeros_like(mine) for _ in range(d.world_size)]
        dist.all_gather(gathered, mine)
        if not d.is_main or self.steps_done == 0:
            return []
        return self.build_records(step, torch.stack(gathered).cpu().tolist())

    def build_records(self, step: int, table: list[list[float]]) -> list[dict]:
        """The global record, then one per node, from every rank's numbers.

        Args:
            step: the optimizer step just finished.
            table: per global rank [elapsed_s, data_wait_s, data_rank, forward_s, stage] since warm-up.

        Returns:
            ``scope: global`` record first, then ``scope: node`` records by node index.
        """
        d = self.dims
        replica_samples = self.global_batch / d.data  # samples per step of one data-parallel replica
        # A rank's work per step in sample-equivalents: its replica's samples x its stage's share / its tensor peers.
        credit = lambda row: replica_samples * self.stage_share[int(row[4])] / d.tensor  # noqa: E731
        wait_fraction = lambda rows: sum(r[1] for r in rows) / max(sum(r[0] for r in rows), 1e-12)  # noqa: E731
        # One window for every record: in synchronous training the steps are common to all nodes, so
        # a node's samples/s is its work over the job's elapsed time and the nodes' figures add up to
        # the global one (each node's own clock, which starts and stops a little apart, is kept as
        # own_elapsed; its own pace is fwd_samples_per_s, or steps_per_s for pipelines).
        window = max(r[0] for r in table)
        glob = self._record("global", step, self.steps_done * self.global_batch, self.global_batch * step,
                            window, wait_fraction(table), d.world_size)
        glob.update(self._percentiles())
        nodes = []
        for node in range(d.num_nodes):
            rows = [table[r] for r in range(d.world_size) if d.node_of_rank[r] == node]
            node_samples = sum(credit(r) for r in rows)
            rec = self._record("node", step, node_samples * self.steps_done, node_samples * step,
                               window, wait_fraction(rows), len(rows), node=node)
            rec["own_elapsed"] = max(r[0] for r in rows)
            forward_s = max(r[3] for r in rows)
            rec["fwd_samples_per_s"] = node_samples * self.steps_done / forward_s if forward_s > 0 else None
            rec["work_fraction"] = node_samples / self.global_batch  # this node's share of every step's FLOPs
            rec["steps_per_s"] = self.steps_done / rec["own_elapsed"] if rec["own_elapsed"] > 0 else 0.0
            nodes.append(rec)
        glob.update(self._stragglers(nodes))
        return [glob] + nodes

    def _stragglers(self, nodes: list[dict]) -> dict:
        """Slowest and fastest node by pace, their spread, and the nodes below the threshold (warned)."""
        # Without forward timings (pipelines) the pace is steps/s: the nodes' samples/s differ by
        # their stages' shares of the work, which says nothing about their speed.
        basis = "fwd_samples_per_s" if all(n["fwd_samples_per_s"] for n in nodes) else "steps_per_s"
        pace = [n[basis] for n in nodes]
        median = statistics.median(pace)
        slow, fast = min(range(len(nodes)), key=pace.__getitem__), max(range(len(nodes)), key=pace.__getitem__)
        below = [i for i, p in enumerate(pace) if p < self.straggler_fraction * median]
        for i in below:
            logger.warning("straggler: node %d (%s) runs at %.4g %s, %.2f of the median node's %.4g "
                           "(log.straggler_fraction=%g)", i, nodes[i]["hostname"], pace[i], basis,
                           pace[i] / median, median, self.straggler_fraction)
        return {"straggler_basis": basis, "slowest_node": slow, "slowest_host": nodes[slow]["hostname"],
                "fastest_node": fast, "fastest_host": nodes[fast]["hostname"],
                "node_spread": (pace[fast] - pace[slow]) / median if median > 0 else 0.0,
                "stragglers": [nodes[i]["hostname"] for i in below]}

    def _record(self, scope: str, step: int, measured: float, samples: float, elapsed_s: float,
                data_wait_fraction: float, devices: int, node: int | None = None) -> dict:
        d = self.dims
        samples_per_s = measured / elapsed_s if elapsed_s > 0 else 0.0
        per_device = samples_per_s / devices
        tflops = per_device * 3 * self.flops_per_sample / 1e12
        hw_tflops = per_device * (4 if self.recompute else 3) * self.flops_per_sample / 1e12
        rec = {
            "kind": "throughput", "scope": scope, "time": time.time(), "step": step,
            "samples": int(round(samples)), "measured_steps": self.steps_done,
            "measured_samples": int(round(measured)), "elapsed": elapsed_s,
            "samples_per_s": samples_per_s, "samples_per_s_per_device": per_device,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "hfu": hw_tflops / self.peak_tflops if self.peak_tflops else None,
            "data_wait_fraction": data_wait_fraction,
            "node": node if node is not None else d.node, "nodes": d.num_nodes, "devices": devices,
            "world_size": d.world_size,
        }
        if self.teacher_flops_per_sample:  # counted apart: mfu / hfu above are the student's alone
            teacher = per_device * self.teacher_copies * self.teacher_flops_per_sample / 1e12
            rec.update(teacher_flops_per_sample=self.teacher_flops_per_sample, teacher_tflops_per_device=teacher,
                       mfu_with_teacher=(tflops + teacher) / self.peak_tflops if self.peak_tflops else None)
        if scope == "node":
            rec["hostname"] = d.node_hosts[node]
        rec.update(self.info)
        return rec

    def _percentiles(self) -> dict:
        times = sorted(self.step_times_s)
        if not times:
            return {}
        pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
        return {"step_time_s_p50": pick(0.5), "step_time_s_p90": pick(0.9), "step_time_s_max": times[-1]}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` in file order (a resumed run's repeated steps
    included); FileNotFoundError naming the folder if it has none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl; give a run folder written by vitscale-train (run.dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends JSON records, one per line, flushed at once (a crash loses nothing written), and hands
    each to the monitors (``train/monitors.py``: TensorBoard, CSV, W&B), if any."""

    def __init__(self, path: str | Path, monitors=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self.monitors = monitors

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.monitors is not None:
            self.monitors.write(record)

    def close(self) -> None:
        self._f.close()
        if self.monitors is not None:
            self.monitors.close()
