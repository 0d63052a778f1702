"""Monitors: every number of every ``metrics.jsonl`` record as a scalar in TensorBoard, CSV files and
Weights & Biases (``log.tensorboard``, ``log.csv``, ``log.wandb``), written by the one writer of
``metrics.jsonl`` (global rank 0, ``throughput.MetricsWriter``), into the run folder.

Tags: ``train/<field>`` (loss, lr, grad_norm, skipped, ...), ``throughput/<field>`` (the global
record), ``throughput/node/<hostname>/<field>`` (each node's), ``eval/<field>``, ``data/<field>``; a
record's step is the scalar's step; booleans become 0 / 1; strings, lists, nulls, the layout's
constants (``LAYOUT_FIELDS``) and ``time`` are left out (TensorBoard keeps each event's wall time).

Through DeepSpeed's monitor classes (``deepspeed.monitor``: each takes ``(tag, value, step)`` event
lists and writes only on global rank 0, which is our writer's rank), opened with the sections
``config/deepspeed.py``'s ``compose_monitor_config`` composes, each extended where it lacks what a
resumed run needs:

- TensorBoard (``TensorBoardMonitor``): its ``SummaryWriter`` has no ``purge_step``; ours opens torch's
  ``SummaryWriter`` with ``purge_step`` = this start's first step, in a new event file per start.
  Its ``SessionLog.START`` makes TensorBoard's Python reader (``EventAccumulator``, the multiplexer)
  drop every event of earlier files at that step or later; TensorBoard's Rust data server drops
  a tag's events at or after each step that is written again. So the steps after the checkpoint a
  run resumed from show once, with the resumed run's values.
- CSV (``csvMonitor``): it appends and writes each file's header again in every process; ours first
  drops the rows of this start's steps and later from the files an earlier start wrote and writes
  no second header.
- W&B (``WandbMonitor``): its ``wandb.init`` takes only project, group and team; ours also passes the
  mode (offline / online), the folder (``run.dir``, so offline runs land in ``run.dir/wandb/``), the
  run's name and a run id kept in ``run.dir/wandb_id``, so a resumed run continues the same W&B run.
  W&B keeps the first value of a step it has seen (``wandb.log`` ignores steps that go back), so
  after a resume from an earlier checkpoint its history keeps the steps up to the interruption as
  they were first logged; TensorBoard and CSV hold the resumed values.
"""
from __future__ import annotations

import csv
import io
import math
import os
import uuid
from pathlib import Path

from deepspeed.monitor.csv_monitor import csvMonitor
from deepspeed.monitor.monitor import Monitor
from deepspeed.monitor.tensorboard import TensorBoardMonitor
from deepspeed.monitor.wandb import WandbMonitor

from vitscale.files import write_text_atomic


KINDS = ("train", "throughput", "eval", "data")  # the record kinds that become scalars
# fields that name the layout (constant through a start), not a measurement: left out
LAYOUT_FIELDS = ("node", "nodes", "devices", "world_size", "micro_batch", "global_batch")


def scalars(record: dict) -> list[tuple[str, float, int]]:
    """A record's numbers as DeepSpeed monitor events ``(tag, value, step)`` (module docstring)."""
    kind, step = record.get("kind"), record.get("step")
    if kind not in KINDS or step is None:
        return []
    prefix = kind
    if kind == "throughput" and record.get("scope") == "node":
        prefix = f"throughput/node/{record['hostname']}"
    events = []
    for key, value in record.items():
        if key in ("kind", "step", "time", *LAYOUT_FIELDS) or isinstance(value, (str, list, dict)) or value is None:
            continue
        value = float(value)
        if math.isfinite(value) or kind == "train":  # a NaN / Inf loss is worth seeing
            events.append((f"{prefix}/{key}", value, int(step)))
    return events


class _TensorBoard(TensorBoardMonitor):
    """DeepSpeed's TensorBoard monitor with a ``SummaryWriter`` opened at ``purge_step``."""

    def __init__(self, config, purge_step: int):
        self.purge_step = purge_step
        super().__init__(config)

    def get_summary_writer(self, base=None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = os.path.join(self.output_path, self.job_name)
        os.makedirs(log_dir, exist_ok=True)
        self.summary_writer = SummaryWriter(log_dir=log_dir, purge_step=self.purge_step)
        return self.summary_writer

    def close(self) -> None:
        self.summary_writer.close()


class _Csv(csvMonitor):
    """DeepSpeed's CSV monitor (a file per tag: ``step,<field>`` rows) that continues the files of
    earlier starts: their rows from ``purge_step`` on dropped, their headers kept once."""

    def __init__(self, config, purge_step: int):
        super().__init__(config)
        for path in sorted(Path(self.log_dir).glob("*.csv")):
            rows = list(csv.reader(path.read_text().splitlines()))
            header, body = rows[0], [r for r in rows[1:] if r and r != rows[0] and int(r[0]) < purge_step]
            out = io.StringIO()
            csv.writer(out).writerows([header] + body)
            write_text_atomic(path, out.getvalue())
            self.filenames.append(path.stem)  # csvMonitor writes a header only for names not in this list

    def close(self) -> None:
        pass


class _Wandb(WandbMonitor):
    """DeepSpeed's W&B monitor (its ``write_events``: ``wandb.log({tag: value}, step=step)``) started
    with the mode, folder, name and a kept run id, which DeepSpeed's ``wandb.init`` does not pass."""

    def __init__(self, config, mode: str | None, name: str | None, run_dir: Path):
        import wandb

        Monitor.__init__(self, config)  # not WandbMonitor.__init__: its wandb.init lacks what follows
        self.enabled, self.group, self.team, self.project = config.enabled, config.group, config.team, config.project
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
        write_text_atomic(id_file, run_id + "\n")
        self.run = wandb.init(project=self.project, entity=self.team, group=self.group, mode=mode,
                              name=name or run_dir.resolve().name, dir=str(run_dir), id=run_id, resume="allow")

    def close(self) -> None:
        self.run.finish()


class Monitors:
    """The monitors ``sections`` (``compose_monitor_config``) name, for a run that starts after step
    ``start`` (0: a fresh run). Only global rank 0 opens them (``setup.start_run``)."""

    def __init__(self, sections: dict, wandb_cfg, run_dir: str | Path, start: int):
        from deepspeed.monitor.config import get_monitor_config

        config, first = get_monitor_config(sections), start + 1
        self.monitors: list = []
        if config.tensorboard.enabled:
            self.monitors.append(_TensorBoard(config.tensorboard, purge_step=first))
        if config.csv_monitor.enabled:
            self.monitors.append(_Csv(config.csv_monitor, purge_step=first))
        if config.wandb.enabled:
            self.monitors.append(_Wandb(config.wandb, wandb_cfg.mode, wandb_cfg.name, Path(run_dir)))

    def write(self, record: dict) -> None:
        events = scalars(record)
        if events:
            for monitor in self.monitors:
                monitor.write_events(events)

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()
