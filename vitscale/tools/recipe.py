"""``vitscale-recipe``: recipes made of runs, one sub-command each.

- ``fdsl-transfer`` (``tools/fdsl_transfer.py``): formula-driven pre-training against scratch, end to end;
- ``vit-l-search`` (``tools/lr_search.py``): the hyper-parameter search over a ViT size ladder;
- ``synthetic-scaling`` (``tools/synthetic_scaling.py``): synthetic images seen against downstream loss, fitted.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from vitscale.tools import lr_search, synthetic_scaling
from vitscale.tools.fdsl_transfer import DEFAULT_SOURCES, FULL, PRETRAIN_CLASSES, QUICK, QUICK_SOURCES, Plan, fdsl_transfer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitscale-recipe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="recipe", required=True)
    f = sub.add_parser("fdsl-transfer", help="synthetic pre-training vs scratch, fine-tuned on digits")
    budget = f.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the whole recipe (default 30)")
    budget.add_argument("--steps", metavar="PRE,FINE", help="fixed pre-training and fine-tuning step counts instead "
                        "of --minutes (the same compute on any machine, e.g. 472,334)")
    f.add_argument("--generators", help=f"comma-separated sources (default {DEFAULT_SOURCES}; with --quick "
                   f"{QUICK_SOURCES}); scratch = no pre-training")
    f.add_argument("--quick", action="store_true", help="fixed tiny step counts (a few minutes on 2 CPU cores, CI)")
    f.add_argument("--out", type=Path, default=Path("runs/fdsl_transfer"), help="output folder")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--seeds", type=int, default=1, help="repeat every row with seeds --seed .. --seed+S-1; the table "
                   "gives the mean and 95%% interval (--minutes is then the budget of all seeds)")
    f.add_argument("--part", metavar="I/N", help="run only the seeds k with k %% N == I and write no table: N "
                   "processes or jobs share the seeds; the command without --part then skips their finished runs "
                   "and writes the table")
    f.add_argument("--classes", type=int, default=PRETRAIN_CLASSES, help="pre-training classes per synthetic source "
                   f"(default {PRETRAIN_CLASSES}; fewer classes leave chance sooner)")
    lr_search.add_parser(sub)
    synthetic_scaling.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.recipe == "vit-l-search":
        return lr_search.main_args(args)
    if args.recipe == "synthetic-scaling":
        return synthetic_scaling.main_args(args)
    from vitscale.data.synthetic import list_generators

    sources = [s.strip() for s in (args.generators or (QUICK_SOURCES if args.quick else DEFAULT_SOURCES)).split(",")
               if s.strip()]
    unknown = [s for s in sources if s != "scratch" and s not in list_generators()]
    if unknown or not sources:
        parser().error(f"--generators: {', '.join(unknown) or 'none given'}; choose scratch and / or "
                       f"{', '.join(list_generators())}")
    if not args.quick and args.minutes <= 0:
        parser().error(f"--minutes={args.minutes} must be positive")
    plan, minutes = (QUICK, None) if args.quick else (FULL, args.minutes)
    if args.steps:
        try:
            pre, fine = (int(v) for v in args.steps.split(","))
        except ValueError:
            parser().error(f"--steps={args.steps}: give two integers, pre-training and fine-tuning steps (e.g. 472,334)")
        if pre < 1 or fine < 1:
            parser().error(f"--steps={args.steps}: both step counts must be at least 1")
        plan, minutes = Plan(**{**plan.__dict__, "pretrain_steps": pre, "finetune_steps": fine}), None
    if args.seeds < 1 or args.classes < 2 or args.classes == 10:
        parser().error(f"--seeds={args.seeds} must be at least 1 and --classes={args.classes} at least 2 and not 10 "
                       "(the digits' count: the pre-trained head would be kept instead of replaced)")
    plan = Plan(**{**plan.__dict__, "classes": args.classes})
    part = (0, 1)
    if args.part:
        try:
            part = tuple(int(v) for v in args.part.split("/"))
            assert len(part) == 2 and 0 <= part[0] < part[1]
        except (ValueError, AssertionError):
            parser().error(f"--part={args.part}: give I/N with 0 <= I < N (e.g. 0/3)")
        if minutes is not None:
            parser().error("--part needs --steps PRE,FINE: every part must train the same step counts")
    command = "vitscale-recipe " + " ".join(shlex.quote(a) for a in argv)
    fdsl_transfer(sources, args.out, plan, minutes, args.seed, command, args.seeds, part)
    from vitscale.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
