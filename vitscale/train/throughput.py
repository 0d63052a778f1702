"""Throughput: samples/s globally and per node, TFLOP/s and MFU per device, data-wait fraction.

Every rank times its own steps and the time it waits for data. At each log interval
the ranks exchange those few numbers (one small all-gather), and global rank 0 writes
one ``scope: global`` record and one ``scope: node`` record per node, each computed
from that node's own ranks. A single writer keeps ``metrics.jsonl`` free of concurrent
appends from many nodes over a parallel file system.

Like big_vision's ``Chrono``, the first ``warmup_steps`` are left out of the figures
(compilation, allocator and communicator warm-up), and checkpoints happen between
timed steps.

MFU = achieved model FLOP/s per device / peak FLOP/s per device, with model FLOPs
= 3 x forward FLOPs per sample (forward + backward, PaLM appendix B); HFU also counts
the recomputed forward of activation checkpointing (4 x).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

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
    """

    def __init__(self, dims, global_batch: int, flops_per_sample: int, warmup_steps: int,
                 peak_tflops: float | None, recompute: bool = False, info: dict | None = None):
        self.dims, self.global_batch = dims, global_batch
        self.flops_per_sample, self.warmup_steps, self.peak_tflops = flops_per_sample, warmup_steps, peak_tflops
        self.recompute, self.info = recompute, dict(info or {})
        self.steps_done = 0  # steps timed by this meter (after warm-up)
        self.elapsed_s = 0.0
        self.data_wait_s = 0.0
        self.step_times_s: list[float] = []
        self._step_start: float | None = None
        self._seen = 0

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self._seen >= self.warmup_steps:
            self.data_wait_s += time.perf_counter() - t0

    def end_step(self) -> None:
        dt = time.perf_counter() - self._step_start
        self._seen += 1
        if self._seen > self.warmup_steps:
            self.steps_done += 1
            self.elapsed_s += dt
            self.step_times_s.append(dt)

    def records(self, step: int) -> list[dict]:
        """Collective: every rank must call it at the same step. Returns records on rank 0, else []."""
        import torch.distributed as dist

        d = self.dims
        mine = torch.tensor([self.elapsed_s, self.data_wait_s, float(d.data_rank)], dtype=torch.float64,
                            device=d.device)
        gathered = [torch.zeros_like(mine) for _ in range(d.world_size)]
        dist.all_gather(gathered, mine)
        if not d.is_main or self.steps_done == 0:
            return []
        table = torch.stack(gathered).cpu()  # (world, 3): elapsed, data wait, data rank
        per_rank_samples = self.global_batch / d.data  # samples per step of one data-parallel replica
        measured = self.steps_done * self.global_batch
        rows = [self._record("global", step, measured, self.global_batch * step, table[:, 0].max().item(),
                             table[:, 1].sum().item() / max(table[:, 0].sum().item(), 1e-12), d.world_size)]
        rows[0].update(self._percentiles())
        for node in range(d.num_nodes):
            ranks = [r for r in range(d.world_size) if d.node_of_rank[r] == node]
            sub = table[ranks]
            replicas = len(set(sub[:, 2].tolist()))  # distinct data ranks: tensor/pipe peers share samples
            node_samples = replicas * per_rank_samples
            rows.append(self._record("node", step, node_samples * self.steps_done, node_samples * step,
                                     sub[:, 0].max().item(),
                                     sub[:, 1].sum().item() / max(sub[:, 0].sum().item(), 1e-12), len(ranks),
                                     node=node))
        return rows

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


class MetricsWriter:
    """Appends JSON records, one per line, flushed at once (a crash loses nothing written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
