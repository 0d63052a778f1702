"""Progress bars of the long-running commands (``vitscale-synth``, ``-eval``, ``-export``, ``-sweep``):
tqdm, in the training bar's style (``train/setup.py``: ``dynamic_ncols``, a unit, rate and ETA),
always on stderr, so stdout keeps only what scripts parse (``vitscale-eval``'s JSON, ``vitscale-sweep
--mode slurm``'s script).

A bar shows where stderr is a terminal; ``--progress`` shows it anyway (a log file that wants
it), ``--no-progress`` never. The training bar is ``log.progress`` instead (on unless set false).

``LoggedSteps`` follows a run from outside (a sweep's bar, a rehearsal's faults): the highest
step its ``metrics.jsonl`` has logged, read from the file's new bytes only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["LoggedSteps", "add_progress_flags", "progress_bar", "wanted"]


class LoggedSteps:
    """The highest step a run's ``metrics.jsonl`` has logged, read from its new bytes at each ``read()``.

    Args:
        path: the run's ``metrics.jsonl`` (it may not exist yet).
        kind: count only records of this kind (``train``), or None for any record with a step.
        from_end: ignore what the file holds now (an earlier run's records, which a resumed run
            appends to).
    """

    def __init__(self, path: Path, kind: str | None = "train", from_end: bool = False):
        self.path, self.kind, self.step, self._rest = Path(path), kind, 0, b""
        self.offset = self.path.stat().st_size if from_end and self.path.exists() else 0

    def read(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.step
        self.offset += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (self.kind is None or record.get("kind") == self.kind) \
                    and isinstance(record.get("step"), int):
                self.step = max(self.step, record["step"])
        return self.step


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
