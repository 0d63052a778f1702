"""``vitscale-plan CONFIG [key=value ...] --gpus N --gpus-per-node G --gpu-mem GB [--device KIND]``.

Which layouts of the experiment fit the machine, and how fast each will run, before any job is
queued (``vitscale.planner``): every (pipe, tensor, data, ZeRO stage, offload, activation
checkpointing, micro-batch) layout with its memory per device by column (GiB), predicted step
time, samples/s and MFU, fastest first, then the rejected layouts with the reason.

    vitscale-plan configs/vit_22b.yaml --gpus 32 --gpus-per-node 4 --gpu-mem 80 --device a100
    vitscale-plan configs/vit_22b.yaml --gpus 32 --gpus-per-node 4 --gpu-mem 80 --device a100 --json
    vitscale-plan configs/clip_vit_b32_laion.yaml data.source=gratings data.shards=null eval.every=0 \\
        train.global_batch=36864 train.precision=fp16 --device v100 --gpus-per-node 6 --gpu-mem 16 \\
        --inter-bw 25 --micro-batch 48,96,192,384 --scaling 1,2,4,8,16,32,64,128 --nodes

(the LAION configs name shards and an evaluation set of a cluster: plan them with synthetic data).

``--scaling COUNTS --nodes`` prints the strong-scaling table (``# Nodes | # GPUs | samples/s |
efficiency``) of the best fitting layout at each node count (``--mode weak`` keeps the batch per
device of the first count instead of the global batch).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from vitscale.config import ConfigError

logger = logging.getLogger(__name__)

COLUMNS = ("params", "grads", "optimizer", "activations", "buckets", "framework")


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be counts separated by commas, e.g. 1,2,4,8")
    return counts


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' must be a positive number")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitscale-plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="experiment YAML or a shipped config's name")
    ap.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    ap.add_argument("--gpus", type=_positive(int), help="devices in the job (not with --scaling)")
    ap.add_argument("--gpus-per-node", type=_positive(int), default=None, help="devices per node (default: --gpus)")
    ap.add_argument("--gpu-mem", type=_positive(float), default=None, help="memory per device, GB (default: the device's)")
    ap.add_argument("--device", default="a100", help="a100, h100, h200, v100 (default a100); cpu needs --peak-tflops")
    ap.add_argument("--peak-tflops", type=_positive(float), help="per-device peak, overriding the device's")
    ap.add_argument("--efficiency", type=_positive(float), help="achieved fraction of the peak (default: the device's)")
    ap.add_argument("--intra-bw", type=_positive(float), help="collective bandwidth inside a node, GB/s")
    ap.add_argument("--inter-bw", type=_positive(float), help="a node's network bandwidth, GB/s")
    ap.add_argument("--latency", type=_positive(float), help="per collective step, microseconds")
    ap.add_argument("--micro-batch", type=_counts, help="micro-batches to try, e.g. 4,8,16 (default: all divisors)")
    ap.add_argument("--top", type=int, default=15, help="fitting layouts in the table (default 15)")
    ap.add_argument("--rejected", type=int, default=10, help="rejected layouts listed (default 10)")
    ap.add_argument("--json", action="store_true", help='print {"layouts": [rows]} (or {"scaling": rows}) instead')
    ap.add_argument("--scaling", type=_counts, help="device counts (node counts with --nodes) to predict a table for")
    ap.add_argument("--nodes", action="store_true", help="--scaling counts are nodes of --gpus-per-node devices")
    ap.add_argument("--mode", choices=["strong", "weak"], default="strong",
                    help="--scaling: strong keeps train.global_batch, weak the batch per device (default strong)")
    return ap


def _machine(args, gpus: int):
    from vitscale.planner import machine_for

    if args.device == "cpu" and not args.peak_tflops:
        raise ValueError("--device cpu has no peak of its own: give --peak-tflops (benchmarks/plan_check.py "
                         "measures one)")
    return machine_for(args.device, gpus, args.gpus_per_node or gpus, args.gpu_mem, peak_tflops=args.peak_tflops,
                       efficiency=args.efficiency, intra_bw_gbs=args.intra_bw, inter_bw_gbs=args.inter_bw,
                       latency_us=args.latency)


def _table(plans, machine, top: int, rejected: int) -> str:
    fit = [p for p in plans if p.fits]
    bad = [p for p in plans if not p.fits]
    head = ("| rank | pipe | tensor | data | zero | offload | ckpt | micro | accum | "
            + " | ".join(f"{c} GB" for c in COLUMNS) + " | total GB | step s | samples/s | MFU |")
    lines = [f"{machine.gpus} x {machine.device.name} ({machine.mem_gb:g} GB, {machine.gpus_per_node} per node, "
             f"{machine.device.peak_tflops:g} TFLOP/s peak x {machine.device.efficiency:g}): "
             f"{len(fit)} layouts fit, {len(bad)} rejected", "", head,
             "|" + " ---: |" * (head.count("|") - 1)]
    for i, p in enumerate(fit[:top], 1):
        lines.append(f"| {i} | {p.pipe} | {p.tensor} | {p.data} | {p.zero} | {p.offload} | {int(p.checkpointing)} | "
                     f"{p.micro_batch} | {p.grad_accum} | " + " | ".join(f"{p.memory[c]:.2f}" for c in COLUMNS)
                     + f" | {p.memory_gb:.2f} | {p.step_s:.4g} | {p.samples_per_s:.4g} | {100 * p.mfu:.1f}% |")
    if bad:
        lines += ["", f"rejected ({min(rejected, len(bad))} of {len(bad)}, closest to fitting first):"]
        for p in bad[:rejected]:
            lines.append(f"- pipe {p.pipe} tensor {p.tensor} data {p.data} zero {p.zero} offload {p.offload} "
                         f"ckpt {int(p.checkpointing)} micro {p.micro_batch}: {p.memory_gb:.1f} GB; {p.reason}")
    return "\n".join(lines) + "\n"


def _scaling(args, exp) -> tuple[list[dict], str]:
    from vitscale.planner import Machine, enumerate_layouts

    per_node = args.gpus_per_node or 1
    rows, base = [], None
    first = args.scaling[0] * (per_node if args.nodes else 1)
    for count in args.scaling:
        gpus = count * per_node if args.nodes else count
        run = exp
        if args.mode == "weak":
            t = exp.cfg.train
            if (t.global_batch * gpus) % first:
                raise ValueError(f"--mode weak: train.global_batch={t.global_batch} x {gpus} / {first} is not whole")
            run = dataclasses.replace(exp, cfg=dataclasses.replace(
                exp.cfg, train=dataclasses.replace(t, global_batch=t.global_batch * gpus // first)))
        machine: Machine = _machine(args, gpus)
        fit = [p for p in enumerate_layouts(run, machine, args.micro_batch) if p.fits]
        best = fit[0] if fit else None
        if best is not None and base is None:
            base = best.samples_per_s / gpus
        rows.append({"nodes": gpus / per_node, "gpus": gpus, "samples_per_s": best.samples_per_s if best else None,
                     "efficiency": best.samples_per_s / gpus / base if best and base else None,
                     "layout": best.row() if best else None})
    lines = ["| # Nodes | # GPUs | samples/s | efficiency | layout |", "| ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lay = r["layout"]
        desc = (f"pipe {lay['pipe']} tensor {lay['tensor']} data {lay['data']} zero {lay['zero']} micro "
                f"{lay['micro_batch']}{' ckpt' if lay['checkpointing'] else ''}") if lay else "nothing fits"
        sps = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "-"
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] else "-"
        lines.append(f"| {r['nodes']:g} | {r['gpus']} | {sps} | {eff} | {desc} |")
    return rows, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.scaling is None and args.gpus is None:
            raise ValueError("give --gpus N (the devices of the job), or --scaling COUNTS for a scaling table")
        if args.scaling is not None and args.nodes and args.gpus_per_node is None:
            raise ValueError("--scaling ... --nodes needs --gpus-per-node")
        if args.gpus is not None and args.gpus_per_node and args.gpus > args.gpus_per_node \
                and args.gpus % args.gpus_per_node:
            raise ValueError(f"--gpus {args.gpus} is not a whole number of nodes of --gpus-per-node "
                             f"{args.gpus_per_node}")
        if args.top < 0 or args.rejected < 0:
            raise ValueError("--top and --rejected must be >= 0")
        from vitscale.experiment import load_experiment
        from vitscale.planner import enumerate_layouts

        exp = load_experiment(args.config, args.overrides)
        if args.scaling is not None:
            rows, text = _scaling(args, exp)
            sys.stdout.write(json.dumps({"scaling": rows}, indent=1) + "\n" if args.json else text)
            return 0
        machine = _machine(args, args.gpus)
        plans = enumerate_layouts(exp, machine, args.micro_batch)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        logger.error("vitscale-plan: %s", e)
        return 2
    if args.json:
        sys.stdout.write(json.dumps({"machine": dataclasses.asdict(machine.device) | {"gpus": machine.gpus,
                                     "gpus_per_node": machine.gpus_per_node, "mem_gb": machine.mem_gb},
                                     "layouts": [p.row() for p in plans]}) + "\n")
    else:
        sys.stdout.write(_table(plans, machine, args.top, args.rejected))
    return 0


if __name__ == "__main__":
    sys.exit(main())
