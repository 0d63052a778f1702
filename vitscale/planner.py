"""The layout planner: which (pipe, tensor, data, ZeRO, offload, activation checkpointing,
micro-batch) layouts of an experiment fit a machine, and how fast each will run, before any
process starts (``vitscale-plan``, ``vitscale-train``'s start-up log, ``benchmarks/plan_check.py``).

Memory per device, in columns (bytes; reported in GiB):

- parameters, gradients, optimizer states by ZeRO stage and precision: mixed-precision Adam keeps
  2 (16-bit weights) + 4 (fp32 master) + 8 (fp32 moments) bytes per parameter (Rajbhandari et al.
  2020, ZeRO, section 3.1: 2 + 2 + 12 with 16-bit gradients; DeepSpeed's ZeRO optimizers keep the
  fp32 master partition for fp32 weights too). Our bf16 runs accumulate gradients
  in fp32 (``config/deepspeed.py``): DeepSpeed's BF16_Optimizer (ZeRO-1, pipelines) keeps a whole
  fp32 gradient buffer, ZeRO-2/3 an fp32 partition. ZeRO-1 partitions the optimizer states over the
  data ranks, ZeRO-2 the gradients too, ZeRO-3 the parameters too; offloading moves the
  optimizer states (and with ``all`` the parameters) to host memory.
- activations of one micro-batch per block: Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 2 and section 4.1), s b h (10 + 24/t + 5 a s /
  (h t)) bytes with 16-bit activations, tensor parallelism t and no sequence parallelism; the 24
  is 8 + 4 r for an MLP of r x the width, the 5 a s / h term the attention scores, which a fused
  attention kernel (SDPA's flash / memory-efficient kernels on a GPU) never stores. Full
  recomputation keeps each block's input (2 s b h) and one block's activations at a time. A 1F1B
  pipeline's first stage holds min(p, m) micro-batches in flight (Narayanan et al. 2021).
- communication buckets (the preset's reduce / all-gather / prefetch buckets) and a fixed
  allowance for the framework (CUDA context, NCCL buffers, allocator slack; on the CPU the
  process's measured resident size).

Step time: every stage computes its share of the exact FLOPs (``models/flops.py``, 3 x forward, 4 x
with recomputation) at the device's peak x efficiency; collectives are rings (all-reduce moves
2 (n-1)/n of the buffer, reduce-scatter and all-gather (n-1)/n, each with (n-1) or 2 (n-1)
latencies) at the intra-node bandwidth, or the node's inter-node bandwidth shared by the groups on
it; tensor parallelism all-reduces each block's output twice forward and twice backward (once each
for a parallel block; Shoeybi et al. 2019), not overlapped; a pipeline sends each micro-batch's
activations forward and gradients back, and a 1F1B step takes the slowest stage's micro-batch time m
times plus every other stage's once (its bubble: (p-1)/(m+p-1) of the step when balanced); ZeRO-0/1
reduce gradients once per step after the backward pass, ZeRO-2 every micro-batch overlapped with
the backward pass when the preset says ``overlap_comm``, ZeRO-3 gathers the parameters for every
forward and backward, prefetching under the compute; the optimizer step streams its states through
device memory (or host Adam and PCIe with offload).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

from torch import nn

from vitscale.config import ConfigError
from vitscale.config.deepspeed import communication_buckets
from vitscale.config.schema import Config
from vitscale.config.validation import check_config, validate_layout
from vitscale.experiment import Experiment
from vitscale.models.flops import layer_flops
from vitscale.models.parallelize import check_layout, pipeline_layers

GIB = 2**30
OFFLOADS = ("none", "optimizer", "all")
OPTIMIZER_STATE_BYTES = {"adamw": 8, "lamb": 8, "lion": 4}  # fp32 states per parameter (optim.name)
# Adam's step reads gradient, fp32 master, both moments and writes master, moments and the 16-bit
# copy: 4 x 4 + 3 x 4 bytes + the weight (apex / DeepSpeed fused Adam: one pass over each).
ADAM_BYTES = 28
HOST_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeed's CPU Adam on a many-core host (ZeRO-Offload, Ren et al. 2021, fig. 7)
PCIE_GBS = 25.0  # host <-> device per GPU, PCIe 4 x16 as measured (not the 32 GB/s link rate)


@dataclass(frozen=True)
class DeviceKind:
    """What the planner needs to know of an accelerator (or of the CPU as one)."""

    name: str
    peak_tflops: float  # dense bf16 (V100: fp16 tensor cores), vendor data sheets; the CPU: measured
    efficiency: float  # the fraction of the peak a transformer block's matrix products reach
    mem_gb: float  # memory per device (GiB), the default for --gpu-mem
    mem_bw_gbs: float  # device memory bandwidth: the optimizer step is bound by it
    intra_bw_gbs: float  # collective bus bandwidth inside a node (NVLink; NCCL's busbw)
    inter_bw_gbs: float  # one node's network bandwidth to the others (all its NICs)
    latency_us: float  # per message of a collective step
    framework_gb: float  # fixed allowance: CUDA context, NCCL, allocator slack (CPU: measured RSS)
    fused_attention: bool = True  # SDPA's flash / memory-efficient kernels: no (s x s) scores saved
    overhead_s: float = 0.0  # per micro-batch: framework and launch overhead (measured on the CPU)
    optimizer_params_per_s: float = 0.0  # Adam's rate; 0 = mem_bw_gbs / ADAM_BYTES


# Known devices. Peaks from the data sheets (as train/throughput.py's PEAK_TFLOPS); efficiencies are
# what well-tuned transformer stacks reach (Megatron-LM reports 45-55% of A100 peak, Narayanan
# et al. 2021; ViT-22B 54.9% on TPU v4); bandwidths NCCL's typical bus bandwidths; network per node:
# 4 x HDR-200 (A100 nodes as JUWELS Booster), 8 x NDR-400 (H100 / H200 DGX), 2 x EDR (Summit V100).
DEVICES: dict[str, DeviceKind] = {
    "a100": DeviceKind("a100", 312.0, 0.50, 80, 2039, 230, 100, 5.0, 2.0),
    "h100": DeviceKind("h100", 989.0, 0.45, 80, 3350, 370, 400, 5.0, 2.5),
    "h200": DeviceKind("h200", 989.0, 0.45, 141, 4800, 370, 400, 5.0, 2.5),
    "v100": DeviceKind("v100", 125.0, 0.40, 16, 900, 50, 25, 5.0, 1.5),
    # The CPU has no peak of its own: benchmarks/plan_check.py measures these constants.
    "cpu": DeviceKind("cpu", 0.0, 1.0, 0, 10, 1.0, 1.0, 50.0, 0.5, fused_attention=False),
}


@dataclass(frozen=True)
class Machine:
    """The machine a layout runs on."""

    gpus: int
    gpus_per_node: int
    device: DeviceKind
    mem_gb: float  # per device, GiB

    def __post_init__(self):
        for key, value in (("gpus", self.gpus), ("gpus_per_node", self.gpus_per_node)):
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        if self.mem_gb <= 0:
            raise ValueError(f"gpu memory {self.mem_gb} GB must be > 0")
        if self.device.peak_tflops <= 0:
            raise ValueError(f"device {self.device.name} has no known peak: give its peak TFLOP/s (--peak-tflops)")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"gpus={self.gpus} is not a whole number of nodes of {self.gpus_per_node}")

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)


@dataclass
class LayoutPlan:
    """One layout: memory per device (GiB, by column), predicted step time, and whether it fits."""

    pipe: int
    tensor: int
    data: int
    zero: int
    offload: str
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    memory: dict[str, float] = field(default_factory=dict)  # column -> GiB
    step_s: float = 0.0
    times_s: dict[str, float] = field(default_factory=dict)  # compute, exposed communication, bubble, ...
    samples_per_s: float = 0.0
    mfu: float = 0.0
    fits: bool = True
    reason: str = ""
    legal: bool = True  # passes every check but memory

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values())

    def row(self) -> dict:
        """The layout as a flat JSON row (``vitscale-plan --json``)."""
        return {"pipe": self.pipe, "tensor": self.tensor, "data": self.data, "zero": self.zero,
                "offload": self.offload, "checkpointing": self.checkpointing, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "fits": self.fits, "reason": self.reason,
                "memory_gb": round(self.memory_gb, 4), **{f"{k}_gb": round(v, 4) for k, v in self.memory.items()},
                "step_s": self.step_s, **{f"{k}_s": v for k, v in self.times_s.items()},
                "samples_per_s": self.samples_per_s, "mfu": self.mfu}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of the model, read once from its meta build."""

    layer_replicated: tuple[int, ...]  # per pipeline layer: parameters every tensor rank holds
    layer_split: tuple[int, ...]  # per pipeline layer: parameters tensor parallelism splits
    layer_flops: tuple[int, ...]  # per pipeline layer: forward FLOPs per sample
    layer_blocks: tuple[int, ...]  # per pipeline layer: index into ``stacks`` (a block) or -1
    stacks: tuple[tuple[int, int, int, float, bool], ...]  # (tokens, width, heads, mlp ratio, parallel block)
    forward_flops: int
    layers: tuple  # the meta layers, for stage_bounds
    stage_tensors: int  # float tensors a pipeline stage sends on (2 for a CLIP)


def model_shape(exp: Experiment) -> ModelShape:
    """The per-layer parameter and FLOP counts of ``exp``'s model (one meta build)."""
    spec = exp.model
    layers = pipeline_layers(spec)
    flops = layer_flops(spec.arch)
    if spec.kind == "cappa":  # the decoder's blocks counted as self-attention blocks (cross-attention left out)
        v, dec = spec.arch.vision, spec.arch.decoder
        stacks = ((v.vit.seq_len, v.width, v.heads, v.mlp_ratio, False),
                  (dec.context_length, dec.width, dec.heads, dec.mlp_ratio, False))
        blocks = [-1] + [0] * v.layers + [1] * dec.layers + [-1]
    elif spec.kind == "clip":
        v, t = spec.arch.vision, spec.arch.text
        stacks = ((v.vit.seq_len, v.width, v.heads, v.mlp_ratio, False),
                  (t.context_length, t.width, t.heads, t.mlp_ratio, False))
        blocks = [-1] + [0] * v.layers + [1] * t.layers + [-1]
    else:
        a = spec.arch
        stacks = ((a.seq_len + a.tape_tokens, a.embed_dim, a.num_heads, a.mlp_hidden / a.embed_dim,  # AdaTape's slots
                   bool(a.parallel_block)),)
        blocks = [-1] + [0] * a.depth + [-1]
    replicated, split, cache = [], [], {}
    for _, layer in layers:
        s = _split_parameters(layer, cache)
        total = sum(p.numel() for p in layer.parameters())
        replicated.append(total - s)
        split.append(s)
    if not len(layers) == len(flops) == len(blocks):
        raise RuntimeError(f"{spec.name}: {len(layers)} pipeline layers, {len(flops)} FLOP counts, {len(blocks)} kinds")
    return ModelShape(tuple(replicated), tuple(split), tuple(flops), tuple(blocks), stacks, spec.forward_flops(),
                      tuple(layer for _, layer in layers), 2 if spec.kind == "clip" else 1)


def _split_parameters(layer: nn.Module, cache: dict) -> int:
    """Parameters of ``layer`` that tensor parallelism splits, counted by splitting a copy of it as a
    run does (``models/tensor_parallel.py``'s ``parallelize_vit`` on the meta device): with k ranks a
    layer of n parameters keeps r + s / k, so s = k / (k - 1) x (n - kept). Layers of one kind and
    size are counted once."""
    import copy

    from vitscale.models.tensor_parallel import parallelize_vit

    n = sum(p.numel() for p in layer.parameters())
    key = (type(layer).__name__, n)
    if key not in cache:
        cache[key] = 0
        for k in (2, 3, 5, 7):  # the first degree that splits the layer's heads
            try:
                kept = sum(p.numel() for p in parallelize_vit(copy.deepcopy(layer), 0, k, None).parameters())
            except (ValueError, ConfigError):
                continue
            cache[key] = round(k / (k - 1) * (n - kept))
            break
    return cache[key]


@lru_cache(maxsize=64)
def _stages(shape: ModelShape, pipe: int, partition: str) -> tuple[tuple[range, ...], tuple[float, ...]]:
    """The layers of each pipeline stage (as ``PipelineModule`` partitions them) and their FLOPs."""
    from vitscale.models.pipeline import stage_bounds  # imports deepspeed: only when a plan is made

    bounds = stage_bounds(list(shape.layers), pipe, partition) if pipe <= len(shape.layers) \
        else [0, len(shape.layers)]
    stages = tuple(range(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1))
    return stages, tuple(sum(shape.layer_flops[j] for j in st) for st in stages)


# --------------------------------------------------------------------------- collectives


def _ring_s(kind: str, size_bytes: float, n: int, bw_gbs: float, latency_us: float) -> float:
    """A ring collective over n ranks: all-reduce moves 2 (n-1)/n of the buffer in 2 (n-1) steps,
    reduce-scatter and all-gather (n-1)/n in n-1 steps (Patarasuk & Yuan 2009; NCCL's busbw)."""
    if n <= 1 or size_bytes <= 0:
        return 0.0
    factor = 2 if kind == "all_reduce" else 1
    return factor * (n - 1) / n * size_bytes / (bw_gbs * 1e9) + factor * (n - 1) * latency_us * 1e-6


def _group_bw(machine: Machine, members: int, stride: int) -> float:
    """Bus bandwidth of a group of ``members`` ranks spaced ``stride`` apart (ranks are numbered
    node by node): inside a node the intra-node bandwidth; across nodes the node's network,
    shared by the gpus_per_node / (members per node) groups that use it at the same time."""
    dev, g = machine.device, machine.gpus_per_node
    if members * stride <= g:
        return dev.intra_bw_gbs
    per_node = max(1, g // stride) if stride < g else 1
    return min(dev.intra_bw_gbs, dev.inter_bw_gbs * min(per_node, members) / g)


# --------------------------------------------------------------------------- one layout


def _activation_bytes(stack: tuple, b: int, t: int, width_bytes: int, fused: bool, recompute: bool) -> float:
    """Activations one block of ``stack`` keeps for the backward pass of a micro-batch of b samples."""
    s, h, a, r, _ = stack
    if recompute:  # only the block's input stays (Korthikanti et al., section 4.1: 2 s b h)
        return s * b * h * width_bytes
    scores = 0.0 if fused else 5 * a * s * s * b / t
    return (s * b * h * (10 + (8 + 4 * r) / t) + scores) * width_bytes / 2


def plan_layout(exp: Experiment, machine: Machine, shape: ModelShape, pipe: int, tensor: int, zero: int,
                offload: str = "none", checkpointing: bool = False, micro_batch: int | None = None) -> LayoutPlan:
    """Memory and step time of one layout (see the module docstring); ``fits`` and ``reason`` say
    whether it can run: the repository's own checks (``config/validation.py``, ``check_layout``),
    then memory.

    Args:
        exp: the experiment (its train.global_batch, precision, model).
        machine: the devices.
        shape: ``model_shape(exp)``.
        pipe, tensor, zero, offload, checkpointing, micro_batch: the layout; data = gpus / (pipe x tensor).
    """
    cfg, dev = exp.cfg, machine.device
    micro_batch = micro_batch or cfg.train.micro_batch
    data = max(1, machine.gpus // (pipe * tensor))
    accum = max(1, cfg.train.global_batch // max(1, micro_batch * data))
    plan = LayoutPlan(pipe, tensor, data, zero, offload, checkpointing, micro_batch, accum)
    reasons = _illegal(exp, machine.gpus, pipe, tensor, zero, offload, checkpointing, micro_batch)

    w = 4 if cfg.train.precision == "fp32" else 2  # bytes of a weight / an activation
    # this device's parameters: the largest pipeline stage, its block linears split over tensor ranks
    stages, stage_flops = _stages(shape, pipe, cfg.parallel.partition)
    stage_params = [sum(shape.layer_replicated[j] + shape.layer_split[j] / tensor for j in st) for st in stages]
    p_dev = max(stage_params)
    buckets = _buckets(cfg, zero)
    host_optimizer = offload in ("optimizer", "all") and zero > 0

    params = p_dev * w / (data if zero == 3 else 1) * (0 if offload == "all" and zero == 3 else 1)
    if host_optimizer and zero >= 2:
        grads = 0.0  # the fp32 gradient partitions live in host memory
    elif zero >= 2:
        grads = 4 * p_dev / data
    elif zero == 1 and w == 4:  # DeepSpeedZeroOptimizer: the weights' whole .grad and its fp32 partition's
        grads = 4 * p_dev + 4 * p_dev / data
    else:  # fp32 accumulation buffer (bf16: BF16_Optimizer's whole fp32 copy), unpartitioned
        grads = 4 * p_dev
    # Adam's / LAMB's moments (8 B; Lion keeps one, 4 B) and, under ZeRO, an fp32 master partition (4 B):
    # DeepSpeed's ZeRO optimizers clone one even from fp32 weights (stage_1_and_2.py / stage3.py); without
    # ZeRO an fp32 run's optimizer steps the weights themselves.
    moments = OPTIMIZER_STATE_BYTES[cfg.optim.name]
    optimizer = 0.0 if host_optimizer else (moments + (0 if w == 4 and zero == 0 else 4)) * p_dev / (data if zero >= 1 else 1)
    in_flight = min(pipe, accum) if pipe > 1 else 1
    acts = 0.0
    for st in stages:  # the stage that keeps the most
        kept = [_activation_bytes(shape.stacks[shape.layer_blocks[j]], micro_batch, tensor, w, dev.fused_attention,
                                  checkpointing) for j in st if shape.layer_blocks[j] >= 0]
        stage_acts = in_flight * sum(kept)
        if checkpointing and kept:  # one block's whole activations while it is recomputed
            stage_acts += max(_activation_bytes(shape.stacks[shape.layer_blocks[j]], micro_batch, tensor, w,
                                                dev.fused_attention, False) for j in st if shape.layer_blocks[j] >= 0)
        acts = max(acts, stage_acts)
    if pipe > 1:  # send and receive buffers of the tensors stages pass on
        s0, h0 = shape.stacks[0][0], shape.stacks[0][1]
        acts += 2 * shape.stage_tensors * micro_batch * s0 * h0 * w
    comm = (min(buckets["reduce"], p_dev) * 4 + min(buckets["gather"], p_dev) * w) if data > 1 or zero == 3 else 0.0
    plan.memory = {"params": params / GIB, "grads": grads / GIB, "optimizer": optimizer / GIB,
                   "activations": acts / GIB, "buckets": comm / GIB, "framework": dev.framework_gb}

    # ---- time
    rate = dev.peak_tflops * 1e12 * dev.efficiency
    mult = 4 if checkpointing else 3
    passes = mult - 1  # passes through a block: forward, backward (+ the recomputed forward)
    stage_compute = [f * micro_batch * mult / tensor / rate for f in stage_flops]
    stage_tp = [0.0] * len(stages)
    if tensor > 1:
        bw_t = _group_bw(machine, tensor, 1)
        for i, st in enumerate(stages):
            for s, h, _, _, parallel in (shape.stacks[shape.layer_blocks[j]] for j in st if shape.layer_blocks[j] >= 0):
                per_pass = 1 if parallel else 2  # all-reduces per pass through the block
                stage_tp[i] += per_pass * passes * _ring_s("all_reduce", s * micro_batch * h * w, tensor, bw_t,
                                                           dev.latency_us)
    slowest = max(range(len(stages)), key=lambda i: stage_compute[i] + stage_tp[i])
    compute_mb, tp_mb = stage_compute[slowest], stage_tp[slowest]
    p2p_mb = 0.0
    if pipe > 1:
        stage_ranks = data * tensor
        inter = stage_ranks >= machine.gpus_per_node
        bw_p = dev.inter_bw_gbs / min(machine.gpus_per_node, stage_ranks) if inter else dev.intra_bw_gbs
        s0, h0 = shape.stacks[0][0], shape.stacks[0][1]
        p2p_mb = 2 * (shape.stage_tensors * micro_batch * s0 * h0 * w / (bw_p * 1e9) + dev.latency_us * 1e-6)
    bw_d = _group_bw(machine, data, tensor)
    grad_bytes = p_dev * (2 if cfg.train.grad_comm_dtype == "bf16" else 4)
    zero3_mb = exposed_mb = 0.0
    per_step = 0.0
    if zero == 3:  # every micro-batch: gather for forward and backward, reduce-scatter the gradients
        zero3_mb = (2 * _ring_s("all_gather", p_dev * w, data, bw_d, dev.latency_us)
                    + _ring_s("reduce_scatter", grad_bytes, data, bw_d, dev.latency_us))
        exposed_mb = max(0.0, zero3_mb - compute_mb) if buckets["overlap"] else zero3_mb
    elif zero == 2:
        rs = _ring_s("reduce_scatter", grad_bytes, data, bw_d, dev.latency_us)
        exposed_mb = max(0.0, rs - compute_mb * 2 / mult) if buckets["overlap"] else rs
        per_step += _ring_s("all_gather", p_dev * w, data, bw_d, dev.latency_us)
    else:  # after the last micro-batch's backward pass
        per_step += _ring_s("all_reduce", grad_bytes, data, bw_d, dev.latency_us)
        if zero == 1:
            per_step += _ring_s("all_gather", p_dev * w, data, bw_d, dev.latency_us)
    updated = p_dev / (data if zero >= 1 else 1)
    if host_optimizer:
        optimizer_s = updated / HOST_ADAM_PARAMS_PER_S + updated * (4 + w) / (PCIE_GBS * 1e9)
        if offload == "all":
            optimizer_s += accum * 2 * p_dev / data * w / (PCIE_GBS * 1e9)
    else:
        optimizer_s = updated / (dev.optimizer_params_per_s or dev.mem_bw_gbs * 1e9 / ADAM_BYTES)
    # a micro-batch's forward and backward on each stage, run in DeepSpeed's 1F1B order
    forward = tuple(c / mult + t / passes + (p2p_mb + dev.overhead_s) / 2 for c, t in zip(stage_compute, stage_tp))
    backward = tuple(c + t + p2p_mb + exposed_mb + dev.overhead_s - f
                     for c, t, f in zip(stage_compute, stage_tp, forward))
    mb_s = forward[slowest] + backward[slowest]
    pipeline_s = one_f_one_b_s(forward, backward, accum)
    plan.step_s = pipeline_s + per_step + optimizer_s
    plan.times_s = {"compute": accum * compute_mb, "tensor_comm": accum * tp_mb, "pipe_comm": accum * p2p_mb,
                    "data_comm": per_step + accum * exposed_mb, "bubble": pipeline_s - accum * mb_s,
                    "optimizer": optimizer_s, "overhead": accum * dev.overhead_s}
    plan.samples_per_s = cfg.train.global_batch / plan.step_s
    plan.mfu = plan.samples_per_s * 3 * shape.forward_flops / (machine.gpus * dev.peak_tflops * 1e12)

    over = plan.memory_gb - machine.mem_gb
    if over > 0:
        reasons.append(f"too little memory: needs {plan.memory_gb:.1f} GB of {machine.mem_gb:g} GB per device "
                       f"({over:.1f} GB over)")
    plan.legal = not reasons or over > 0 and len(reasons) == 1
    plan.fits = not reasons
    plan.reason = "; ".join(reasons)
    return plan


SCHEDULE_CAP = 128  # micro-batches simulated; more are extrapolated from the last 64 (within 0.1 %)


@lru_cache(maxsize=4096)
def one_f_one_b_s(forward: tuple[float, ...], backward: tuple[float, ...], micro_batches: int) -> float:
    """Seconds of one step of a 1F1B pipeline (PipeDream-Flush, Narayanan et al. 2021) whose stage i
    takes ``forward[i]`` and ``backward[i]`` per micro-batch, as DeepSpeed's ``TrainSchedule`` orders
    it: stage i runs min(p - i - 1, m) forwards, then a forward and a backward in turn, then the
    backwards left; a forward waits for the stage before, a backward for the stage after. Simulated
    rather than (m + p - 1) x the slowest stage, which is exact only for balanced stages (unbalanced
    ones, e.g. a CLIP's image and text towers, finish up to a quarter sooner); sum + (m - 1) x max
    (DAPPLE, Alpa) bounds it from above. One stage: m x (forward + backward)."""
    p, m = len(forward), micro_batches
    if p == 1:
        return m * (forward[0] + backward[0])
    if m > SCHEDULE_CAP:  # the steady state: the slope of the last half of the simulated micro-batches
        half, full = (one_f_one_b_s(forward, backward, k) for k in (SCHEDULE_CAP // 2, SCHEDULE_CAP))
        return full + (m - SCHEDULE_CAP) * (full - half) / (SCHEDULE_CAP - SCHEDULE_CAP // 2)
    orders = []
    for i in range(p):
        warm = min(p - i - 1, m)
        order = [(0, k) for k in range(warm)]
        for k in range(m - warm):
            order += [(0, warm + k), (1, k)]
        orders.append(order + [(1, k) for k in range(m - warm, m)])
    done = [[[None] * m, [None] * m] for _ in range(p)]  # done[stage][0 forward / 1 backward][micro-batch]
    at, free = [0] * p, [0.0] * p
    while True:
        moved = False
        for i in range(p):
            while at[i] < len(orders[i]):
                kind, k = orders[i][at[i]]
                peer = i - 1 if kind == 0 else i + 1
                ready = done[peer][kind][k] if 0 <= peer < p else 0.0
                if ready is None:
                    break
                free[i] = done[i][kind][k] = max(free[i], ready) + (backward[i] if kind else forward[i])
                at[i] += 1
                moved = True
        if not moved:
            break
    return max(free)


def _buckets(cfg: Config, zero: int) -> dict:
    if zero not in _BUCKETS:
        variant = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero=zero, offload=None,
                                                                         ds_preset="auto"))
        try:
            _BUCKETS[zero] = communication_buckets(variant)
        except ConfigError:  # a preset the layout cannot use: the legality checks say why
            _BUCKETS[zero] = {"reduce": 0, "gather": 0, "overlap": 0}
    return _BUCKETS[zero]


_BUCKETS: dict[int, dict] = {}


def _illegal(exp: Experiment, world: int, pipe: int, tensor: int, zero: int, offload: str, checkpointing: bool,
             micro_batch: int) -> list[str]:
    """Why a layout cannot run, by the checks every start makes (empty: it can)."""
    cfg = exp.cfg
    if world % (pipe * tensor):
        return [f"does not divide: {world} devices are not a multiple of pipe x tensor = {pipe * tensor}"]
    variant = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, pipe=pipe, tensor=tensor, zero=zero, offload=offload,
                                          ds_preset="auto", activation_checkpoint=int(checkpointing)),
        train=dataclasses.replace(cfg.train, micro_batch=micro_batch))
    reasons = []
    for check in (lambda: _check_parallel(variant), lambda: validate_layout(variant, world),
                  lambda: check_layout(exp.model, tensor, pipe)):
        try:
            check()
        except ConfigError as e:
            reasons.append(str(e))
    return reasons


def _check_parallel(cfg: Config) -> None:
    """``check_config`` on a layout variant (the parallel, precision and batch rules), cached: the
    rest of the config is the same for every layout, and only whether pipe / tensor exceed 1 changes
    which rules apply (the exact degrees are checked again, for the message, where one fails)."""
    p = cfg.parallel
    rest = (p.zero, p.offload, cfg.train.micro_batch, p.activation_checkpoint, cfg.train.precision, cfg.optim.name)
    for key, variant in (((p.pipe > 1, p.tensor > 1) + rest, dataclasses.replace(
            cfg, parallel=dataclasses.replace(p, pipe=min(p.pipe, 2), tensor=min(p.tensor, 2)))),
            ((p.pipe, p.tensor) + rest, cfg)):
        if key not in _CHECKED:
            try:
                check_config(variant)
                _CHECKED[key] = None
            except ConfigError as e:
                _CHECKED[key] = str(e)
        if _CHECKED[key] is None:
            return
    raise ConfigError(_CHECKED[key])


_CHECKED: dict[tuple, str | None] = {}


# --------------------------------------------------------------------------- all layouts


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(exp: Experiment, machine: Machine, micro_batches: list[int] | None = None) -> list[LayoutPlan]:
    """Every (pipe, tensor, data, ZeRO 0-3, offload, checkpointing, micro-batch) layout of ``exp`` on
    ``machine``: those that fit first, fastest first, then the rejected ones by how close they came.

    Args:
        micro_batches: the micro-batches to try; None: every divisor of a data rank's share of
            ``train.global_batch``.
    """
    _CHECKED.clear()
    _BUCKETS.clear()
    shape = model_shape(exp)
    gb = exp.cfg.train.global_batch
    plans = []
    for pipe in _divisors(machine.gpus):
        if pipe > len(shape.layers):
            continue
        for tensor in _divisors(machine.gpus // pipe):
            data = machine.gpus // (pipe * tensor)
            mbs = micro_batches or (_divisors(gb // data) if gb % data == 0 else [exp.cfg.train.micro_batch])
            for zero in range(4):
                for offload in OFFLOADS:
                    for ckpt in (False, True):
                        for mb in mbs:
                            plans.append(plan_layout(exp, machine, shape, pipe, tensor, zero, offload, ckpt, mb))
    return rank(plans)


def rank(plans: list[LayoutPlan]) -> list[LayoutPlan]:
    """Fitting layouts fastest first (less memory breaks ties), then the ones rejected for memory
    alone (least memory first), then the illegal ones."""
    return sorted(plans, key=lambda p: (not p.fits, not p.legal, -p.samples_per_s if p.fits else p.memory_gb,
                                        p.memory_gb))


def plan_config(exp: Experiment, machine: Machine) -> LayoutPlan:
    """The prediction for the experiment's own layout (``parallel.*``, ``train.micro_batch``)."""
    p = exp.cfg.parallel
    offload = p.offload or "none"
    return plan_layout(exp, machine, model_shape(exp), p.pipe, p.tensor, p.zero, offload,
                       p.activation_checkpoint > 0, exp.cfg.train.micro_batch)


def strong_scaling(exp: Experiment, device: DeviceKind, gpus_per_node: int, mem_gb: float,
                   nodes: list[int]) -> list[tuple[int, int, LayoutPlan | None]]:
    """The best fitting layout of each node count, train.global_batch fixed: (nodes, gpus, plan or None)."""
    rows = []
    for n in nodes:
        machine = Machine(n * gpus_per_node, gpus_per_node, device, mem_gb)
        fitting = [p for p in enumerate_layouts(exp, machine) if p.fits]
        rows.append((n, n * gpus_per_node, fitting[0] if fitting else None))
    return rows


def machine_for(device: str, gpus: int, gpus_per_node: int, mem_gb: float | None = None, **overrides) -> Machine:
    """A ``Machine`` of a known device kind, any of its constants overridden (None keeps the table's).

    Raises:
        ValueError: an unknown device, naming the known ones.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device '{device}'; known: {', '.join(DEVICES)} (or give --peak-tflops)")
    kind = dataclasses.replace(DEVICES[device], **{k: v for k, v in overrides.items() if v is not None})
    return Machine(gpus, gpus_per_node, kind, mem_gb if mem_gb is not None else kind.mem_gb)


def scaling_efficiency(rows: list[tuple[int, int, LayoutPlan | None]]) -> list[float | None]:
    """Strong-scaling efficiency of each row against the first: (samples/s / nodes) / the first's."""
    base = rows[0][2].samples_per_s / rows[0][0] if rows and rows[0][2] else None
    return [None if base is None or p is None else p.samples_per_s / n / base for n, _, p in rows]




# --------------------------------------------------------------------------- start-up


def device_kind_named(device_name: str) -> DeviceKind | None:
    """The known device kind of a device name such as 'NVIDIA A100-SXM4-80GB' (None: unknown)."""
    lowered = device_name.lower()
    return next((kind for key, kind in DEVICES.items() if key != "cpu" and key in lowered), None)


def predict_own_layout(exp: Experiment, world_size: int, devices_per_node: int, device_name: str,
                       mem_gb: float | None) -> tuple[LayoutPlan, bool]:
    """The prediction for the run's own layout at start-up: (plan, whether its step time means
    anything). A device the table does not know (the CPU) gets its memory predicted only."""
    kind = device_kind_named(device_name)
    timed = kind is not None
    if kind is None:
        kind = dataclasses.replace(DEVICES["cpu"], peak_tflops=exp.cfg.log.peak_tflops or 1.0)
        timed = exp.cfg.log.peak_tflops is not None
    per_node = max(1, min(devices_per_node, world_size))
    if world_size > per_node and world_size % per_node:
        per_node = world_size
    machine = Machine(world_size, per_node, kind, mem_gb or 1e9)
    return plan_config(exp, machine), timed


def describe(plan: LayoutPlan, timed: bool = True) -> str:
    """One line for the log: memory per device by column, step time, samples/s, MFU."""
    cols = ", ".join(f"{k} {v:.2f}" for k, v in plan.memory.items())
    text = f"predicted memory per device {plan.memory_gb:.2f} GB ({cols})"
    if timed:
        text += (f"; step {plan.step_s:.3g} s ({plan.samples_per_s:.4g} samples/s, MFU {100 * plan.mfu:.1f}%, "
                 f"bubble {plan.times_s['bubble']:.3g} s, exposed communication "
                 f"{plan.times_s['data_comm'] + plan.times_s['tensor_comm'] + plan.times_s['pipe_comm']:.3g} s)")
    return text


__all__ = ["DEVICES", "DeviceKind", "LayoutPlan", "Machine", "ModelShape", "describe", "device_kind_named",
           "enumerate_layouts", "machine_for", "model_shape", "plan_config", "plan_layout", "predict_own_layout",
           "rank", "scaling_efficiency", "strong_scaling"]
