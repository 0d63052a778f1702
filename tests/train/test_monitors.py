"""Monitors (issue 26): log.tensorboard / log.csv (/ log.wandb) get every number of every
metrics.jsonl record, read back with TensorBoard's own reader; a resumed run replaces the steps after
its checkpoint (each step once, with the resumed values); config mistakes name the key."""
import csv
import functools
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import read_metrics, run_in_gloo, run_training
from vitscale.config import ConfigError, compose_monitor_config, load_config

SMALL = ["data.image_size=32", "model.patch_size=8", "model.depth=2", "data.num_workers=0", "train.micro_batch=8",
         "train.global_batch=8", "log.every=1", "log.warmup_steps=0"]
MONITORS = ["log.tensorboard=true", "log.csv=true"]


def expected_scalars(records: list[dict]) -> dict[tuple[str, int], float]:
    """What the monitors should hold for these records, worked out here from the record layout:
    (tag, step) -> value; a later record of a (tag, step) replaces an earlier one."""
    out = {}
    for r in records:
        if r["kind"] not in ("train", "throughput", "eval", "data"):
            continue
        prefix = r["kind"] if r.get("scope") != "node" else f"throughput/node/{r['hostname']}"
        for key, value in r.items():
            if key not in ("kind", "step", "time", "node", "nodes", "devices", "world_size", "micro_batch",
                           "global_batch") and isinstance(value, (int, float)) \
                    and (r["kind"] == "train" or math.isfinite(value)):
                out[(f"{prefix}/{key}", r["step"])] = float(value)
    return out


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows the run in ``folder`` (all its event files)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def csv_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """file stem -> [(step, value)] of DeepSpeed's CSV monitor files (header checked)."""
    out = {}
    for path in folder.glob("*.csv"):
        rows = list(csv.reader(path.read_text().splitlines()))
        assert rows[0][0] == "step" and all(r[0] != "step" for r in rows[1:]), path  # one header
        out[path.stem] = [(int(s), float(v)) for s, v in rows[1:]]
    return out


def assert_each_step_once(got: dict[str, list[tuple[int, float]]], want: dict[tuple[str, int], float],
                          name=lambda tag: tag, exact=np.float32) -> None:
    """Every (tag, step) of ``want`` once in ``got``, with its value (as float32 for TensorBoard)."""
    for tag in {t for t, _ in want}:
        steps = [s for s, _ in got.get(name(tag), [])]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps} repeated or out of order"
    held = {(tag, s): v for tag in {t for t, _ in want} for s, v in got.get(name(tag), [])}
    assert held.keys() == want.keys(), (sorted(held.keys() - want.keys()), sorted(want.keys() - held.keys()))
    bad = [(k, held[k], want[k]) for k in want if not (exact(want[k]) == exact(held[k])
                                                       or math.isnan(want[k]) and math.isnan(held[k]))]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """6 steps with checkpoints at 4 and 6 and evaluations at 3 and 6; the step-6 checkpoint is then
    lost, so the same folder resumes from step 4 and trains steps 5-6 again. Returns (run folder,
    records of the first start, records of the second)."""
    run = tmp_path_factory.mktemp("monitored")
    common = SMALL + MONITORS + ["train.steps=6", "checkpoint.every=4", "checkpoint.keep=0", "data.test=digits",
                                 "eval.every=3"]
    run_training(run, common, launcher="python", nprocs=1)
    first = read_metrics(run)
    shutil.rmtree(run / "checkpoints" / "step00000006")  # lost: checkpoint.resume=auto takes step 4
    run_training(run, common, launcher="python", nprocs=1)
    return run, first, read_metrics(run)[len(first):]


def test_tensorboard_holds_every_record_once_with_the_resumed_values(resumed_run):
    run, first, second = resumed_run
    assert [r["step"] for r in second if r["kind"] == "train"] == [5, 6]  # the resume happened
    want = expected_scalars([r for r in first if r["step"] <= 4] + second)
    got = tensorboard_scalars(run / "tensorboard")
    host = next(r["hostname"] for r in first if r.get("scope") == "node")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/skipped", "throughput/samples_per_s",
                "throughput/data_wait_fraction", f"throughput/node/{host}/samples_per_s",
                f"throughput/node/{host}/fwd_samples_per_s", "eval/top1", "eval/top5"):
        assert any(t == tag for t, _ in want), tag  # the records hold it ...
        assert tag in got, sorted(got)  # ... and so does TensorBoard
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in got["eval/top1"]] == [3, 6]
    assert_each_step_once(got, want)
    # the second start's values differ from the first's at some of the steps it replaced (timings),
    # so the check above could tell which start TensorBoard shows
    old = expected_scalars([r for r in first if r["step"] > 4])
    assert any(old[k] != v for k, v in expected_scalars(second).items() if k in old)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one event file per start


def test_csv_holds_every_record_once_with_the_resumed_values(resumed_run):
    run, first, second = resumed_run
    want = expected_scalars([r for r in first if r["step"] <= 4] + second)
    # DeepSpeed's CSV monitor: a file per tag, '/' and ' ' -> '_'
    assert_each_step_once(csv_scalars(run / "csv"), want, name=lambda t: t.replace("/", "_"), exact=float)


def _write_records(rank, world, run_dir, records):
    """In a one-process group (DeepSpeed's monitors write on its rank 0): the writer of a run with
    log.tensorboard and log.csv writes ``records``."""
    import deepspeed

    from vitscale.train.monitors import Monitors
    from vitscale.train.throughput import MetricsWriter

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # takes the group that exists
    cfg = load_config("vit_tiny", MONITORS + [f"run.dir={run_dir}"])
    writer = MetricsWriter(Path(run_dir) / "metrics.jsonl", Monitors(compose_monitor_config(cfg), cfg.log.wandb,
                                                                      run_dir, start=0))
    for r in records:
        writer.write(r)
    writer.close()


def test_data_and_node_records_become_scalars(tmp_path):
    """A counting source's data records (the image-text loader's counters) and two nodes' throughput."""
    from vitscale.data.sources import source_class

    laion = source_class("laion")
    records = []
    for step in (10, 20):
        fields, _ = laion.summarize({k: step * (i + 1) for i, k in enumerate(laion.counters)})
        records.append({"kind": "data", "step": step, **fields})
        for node, host in enumerate(["jwb0001", "jwb0002"]):
            records.append({"kind": "throughput", "scope": "node", "step": step, "node": node, "hostname": host,
                            "samples_per_s": 100.0 + node + step, "mfu": None, "layout": {"data": 2}})
        records.append({"kind": "eval", "step": step, "top1": 12.5, "test_samples": 360})
        records.append({"kind": "checkpoint", "step": step})  # not a kind that becomes scalars
    run_in_gloo(functools.partial(_write_records, run_dir=str(tmp_path), records=records), 1)
    assert read_metrics(tmp_path) == records
    want = expected_scalars(records)
    assert ("data/bad_fraction", 20) in want and ("throughput/node/jwb0002/samples_per_s", 10) in want
    got = tensorboard_scalars(tmp_path / "tensorboard")
    assert_each_step_once(got, want)
    assert not any(t.startswith("checkpoint") or t.split("/")[-1] in ("mfu", "layout", "node") for t in got)
    assert_each_step_once(csv_scalars(tmp_path / "csv"), want, name=lambda t: t.replace("/", "_"), exact=float)


def test_monitor_sections_are_deepspeeds_in_the_run_folder(tmp_path):
    cfg = load_config("vit_tiny", MONITORS + [f"run.dir={tmp_path}"])
    sections = compose_monitor_config(cfg)
    assert sections == {"tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tensorboard"},
                        "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "csv"}}
    assert compose_monitor_config(load_config("vit_tiny")) == {}  # off by default
    from vitscale.train.setup import plan_run

    plan = plan_run("vit_tiny", MONITORS + [f"run.dir={tmp_path}"], world_size=1)
    assert plan.monitor_config == sections
    assert not {"tensorboard", "csv_monitor", "wandb"} & plan.ds_config.keys()  # the engine opens no monitor


@pytest.mark.parametrize("overrides, message", [
    (["log.wandb.mode=offline"], "log.wandb.mode=offline without log.wandb.project: W&B needs the project"),
    (["log.wandb.entity=me", "log.wandb.group=g"], "log.wandb.entity=me, log.wandb.group=g without log.wandb.project"),
    (["log.wandb.project=''"], "log.wandb.project is empty"),
    (["log.wandb=true"], r"'log.wandb' must be a mapping of its keys \(project, mode, entity, group, name\)"),
    (["log.wandb.mode=sometimes"], "log.wandb.mode='sometimes' is not allowed; choose one of 'offline', 'online'"),
    (["log.tensorbord=true"], "did you mean 'log.tensorboard'"),
])
def test_monitor_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("vit_tiny", overrides)


def test_missing_packages_are_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb.project=p needs the wandb package: pip install 'vitscale\[wandb\]'"):
        compose_monitor_config(load_config("vit_tiny", ["log.wandb.project=p"]))
    with pytest.raises(ConfigError, match="log.tensorboard=true needs the tensorboard package: pip install tensorboard"):
        compose_monitor_config(load_config("vit_tiny", ["log.tensorboard=true"]))


def _write_wandb(rank, world, run_dir, records, start):
    import deepspeed

    from vitscale.train.monitors import Monitors

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config("vit_tiny", ["log.wandb.project=vitscale-test", "log.wandb.mode=offline", f"run.dir={run_dir}"])
    monitors = Monitors(compose_monitor_config(cfg), cfg.log.wandb, run_dir, start=start)
    for r in records:
        monitors.write(r)
    monitors.close()


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (``run-<id>.wandb``): LevelDB-log framing (32 KiB
    blocks, 7-byte record headers: crc32, length, type) after W&B's 7-byte file header, each record a
    ``wandb_internal_pb2.Record`` (wandb's own protobuf; wandb 0.31 has no Python reader of the file)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, rows, chunk = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, or the last piece of a record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def test_wandb_offline_writes_into_the_run_folder(tmp_path, monkeypatch):
    """log.wandb (the optional extra, wandb installed): an offline W&B run in run.dir/wandb/ holding the
    records' scalars at their steps; a second start continues the same W&B run."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3 * s, "grad_norm": 0.5, "skipped": False}
               for s in (1, 2, 3)]
    run_in_gloo(functools.partial(_write_wandb, run_dir=str(tmp_path), records=records, start=0), 1)
    run_id = (tmp_path / "wandb_id").read_text().strip()
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = [r for r in wandb_history(run_file) if "train/loss" in r]
    assert [(r["_step"], r["train/loss"], r["train/lr"]) for r in rows] == [(s, 2.0 / s, 1e-3 * s) for s in (1, 2, 3)]
    more = [{"kind": "train", "step": 4, "loss": 0.25}]
    run_in_gloo(functools.partial(_write_wandb, run_dir=str(tmp_path), records=more, start=3), 1)
    assert (tmp_path / "wandb_id").read_text().strip() == run_id  # the same W&B run continues
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2 and [(r["_step"], r["train/loss"]) for r in wandb_history(files[-1])
                                if "train/loss" in r] == [(4, 0.25)]
