"""Progress bars of the long-running commands (``vitscale-synth``, ``-eval``, ``-export``, ``-sweep``):
tqdm, in the training bar's style (``train/setup.py``: ``dynamic_ncols``, a unit, rate and ETA),
always on stderr, so stdout keeps only what scripts parse (``vitscale-eval``'s JSON, ``vitscale-sweep
--mode slurm``'s script).

A bar shows where stderr is a terminal; ``--progress`` shows it anyway (a log file that wants
it), ``--no-progress`` never. The training bar is ``log.progress`` instead (on unless set false).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_progress_flags", "progress_bar", "wanted"]


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (``args.progress``: True, False, or None = where stderr is a terminal)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                       help="show a progress bar on stderr even when it is not a terminal")
    group.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                       help="no progress bar (default: one where stderr is a terminal)")


def wanted(flag: bool | None) -> bool:
    """Whether to show a bar: the flag where given, else whether stderr is a terminal."""
    if flag is not None:
        return flag
    return bool(getattr(sys.stderr, "isatty", None)) and sys.stderr.isatty()


def progress_bar(total: float | None, desc: str, unit: str, show: bool | None = None, **kwargs):
    """A tqdm bar on stderr (disabled, every call a no-op, unless ``wanted(show)``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not wanted(show),
                **kwargs)
