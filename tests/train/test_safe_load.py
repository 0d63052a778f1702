"""Issue 19: no load runs code. A real tiny run's checkpoint has every .pt file replaced by a pickle
whose unpickling would create a file (``__reduce__`` -> ``open(path, "w")``); resume (DeepSpeed's
``engine.load_checkpoint``), ``checkpoint.reshard=weights``, ``vitscale-export`` and ``model.init``
(the run folder, or one of its .pt files) all refuse it, naming the file, and the file is never
created. Three single-process launches (the run, the resume, the reshard); export and model.init
run in this process, through the functions the CLI and ``build_model`` call."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, TINY, read_metrics
from vitscale.train import checkpoint
from vitscale.train.safe_load import UnsafeCheckpoint, load_file, safe_deepspeed_loads

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("RANK", None)

pytestmark = pytest.mark.distributed  # the fixture launches a run
TINY_RUN = ["model.depth=2", "data.source=gratings", "data.image_size=32", "train.micro_batch=4",
            "train.global_batch=8", "log.progress=false", "data.num_workers=0", "checkpoint.at_end=true"]
REFUSED = "this checkpoint holds objects other than tensors and plain data (it asks for io.open)"


class Payload:
    """Unpickled with weights_only=False, this opens (creates) ``path``: code run by a load."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitscale.train", TINY, f"run.dir={run_dir}", *TINY_RUN, *overrides],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2-step run (ZeRO-1, one process) whose checkpoint's .pt files all hold the payload; the
    file the payload would create; an export of the run made before the planting."""
    root = tmp_path_factory.mktemp("planted")
    run = root / "run"
    proc = _train(run, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from vitscale.tools.export import main as export

    assert export([str(run), "--to", "vitscale", "--out", str(root / "before.safetensors")]) == 0  # loads as it is
    files = sorted(checkpoint.checkpoint_root(run).glob("step*/*.pt"))
    names = {f.name for f in files}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank00000.pt"} <= names
    pwned = root / "pwned"
    for f in files:
        torch.save({"module": Payload(pwned)}, f)
    return SimpleNamespace(root=root, run=run, pwned=pwned, folder=files[0].parent)


def test_resume_refuses_a_checkpoint_that_would_run_code(planted):
    proc = _train(planted.run, "train.steps=4", "checkpoint.resume=auto")
    out = proc.stdout + proc.stderr
    assert not planted.pwned.exists(), "the crafted checkpoint ran code on resume"
    assert proc.returncode == 2, out[-3000:]  # a refused input, not a crash
    assert f"refusing to start: {planted.folder}/" in out and REFUSED in out, out[-3000:]
    assert [p.name for p in checkpoint.complete_checkpoints(checkpoint.checkpoint_root(planted.run))] == ["step00000002"]
    assert [r["step"] for r in read_metrics(planted.run) if r["kind"] == "train"][-1] == 2  # no step was taken


def test_reshard_refuses_a_checkpoint_that_would_run_code(planted, tmp_path):
    """checkpoint.reshard=weights (ZeRO-1 -> ZeRO-0: another layout) reads the whole model itself."""
    proc = _train(tmp_path / "resharded", "train.steps=4", "parallel.zero=0", "checkpoint.reshard=weights",
                  f"checkpoint.resume={planted.folder}")
    out = proc.stdout + proc.stderr
    assert not planted.pwned.exists(), "the crafted checkpoint ran code on reshard"
    assert proc.returncode == 2 and REFUSED in out and f"refusing to start: {planted.folder}/" in out, out[-3000:]


def test_export_refuses_a_checkpoint_that_would_run_code(planted, caplog):
    from vitscale.tools.export import main as export

    out = planted.root / "x.safetensors"
    with caplog.at_level(logging.ERROR, logger="vitscale.export"):
        assert export([str(planted.run), "--to", "timm", "--out", str(out)]) == 2
    assert not planted.pwned.exists(), "the crafted checkpoint ran code on export"
    assert not out.exists()
    assert any(REFUSED in r.getMessage() and str(planted.folder) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("which", ["run folder", "checkpoint folder", ".pt file"])
def test_model_init_refuses_a_checkpoint_that_would_run_code(planted, which):
    from vitscale.experiment import load_experiment
    from vitscale.train.initial_weights import load_initial_weights

    path = {"run folder": planted.run, "checkpoint folder": planted.folder,
            ".pt file": planted.folder / "mp_rank_00_model_states.pt"}[which]
    model = load_experiment(TINY, TINY_RUN).model.create()
    with pytest.raises(UnsafeCheckpoint, match=re.escape(REFUSED)) as refused:
        load_initial_weights(model, path)  # what build_model calls for model.init
    assert refused.value.path.parent == planted.folder
    assert not planted.pwned.exists(), f"the crafted checkpoint ran code as model.init={which}"


def test_deepspeeds_checkpoint_engine_loads_weights_only(tmp_path):
    """The engine's checkpoint engine is swapped for one whose load refuses code and keeps
    DeepSpeed's plain-data classes; an engine whose loads it cannot make safe is refused."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), load_universal_checkpoint=lambda: False)
    safe_deepspeed_loads(engine)
    assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine)
    scaler = DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False, dtype=torch.float16)
    engine.checkpoint_engine.save({"w": torch.ones(2), "loss_scaler": scaler}, str(tmp_path / "ok.pt"))
    loaded = engine.checkpoint_engine.load(str(tmp_path / "ok.pt"), map_location=torch.device("cpu"))
    assert torch.equal(loaded["w"], torch.ones(2)) and loaded["loss_scaler"].cur_scale == 2.0 ** 16
    torch.save({"module": Payload(tmp_path / "pwned")}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"bad\.pt: this checkpoint holds objects other than tensors"):
        engine.checkpoint_engine.load(str(tmp_path / "bad.pt"), map_location=torch.device("cpu"))
    with pytest.raises(UnsafeCheckpoint):
        load_file(tmp_path / "bad.pt")
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(ValueError, match=r"checkpoint engine object, whose loads bypass"):
        safe_deepspeed_loads(SimpleNamespace(checkpoint_engine=object(), load_universal_checkpoint=lambda: False))
    with pytest.raises(ValueError, match=r"sets load_universal_checkpoint"):
        safe_deepspeed_loads(SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(),
                                             load_universal_checkpoint=lambda: True))


@pytest.mark.parametrize("preset, key", [({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal"),
                                         ({"checkpoint": {"writer": {"type": "fast"}}}, "checkpoint.writer"),
                                         ({"datastates_ckpt": {}}, "datastates_ckpt")])
def test_a_preset_whose_checkpoint_loads_can_run_code_is_refused_before_start(tmp_path, preset, key):
    import json

    from vitscale.config import ConfigError, compose_ds_config, load_config

    plain, path = tmp_path / "plain.json", tmp_path / "preset.json"
    plain.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **preset}))
    assert compose_ds_config(load_config(TINY, [f"parallel.ds_preset={plain}"]), 2)["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match=rf"sets {re.escape(key)}: its checkpoint loads bypass vitscale's "
                                          r"weights-only reader"):
        compose_ds_config(load_config(TINY, [f"parallel.ds_preset={path}"]), 2)
