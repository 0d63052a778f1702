"""The wheel ships the DeepSpeed presets and the experiment configs (setup.py maps the top-level
ds_configs/ and configs/ to vitscale/ds_configs/ and vitscale/configs/), and a non-editable
install finds its presets without the source tree."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PRESETS = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of ROOT, built once for the module."""
    tmp = tmp_path_factory.mktemp("wheel")
    # setuptools builds in ROOT/build/ by default and copies all of build/lib/ into the wheel, so a
    # build/ left by an earlier build ships files the current setup.py does not (the test would pass
    # without the fix). DIST_EXTRA_CONFIG (read like setup.cfg) moves build/ and the egg-info to tmp.
    extra = tmp / "setup.cfg"
    extra.write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    out = tmp / "dist"
    proc = subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
                           str(ROOT)], env={**os.environ, "DIST_EXTRA_CONFIG": str(extra)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp / "build" / "lib" / "vitscale").is_dir(), "setuptools ignored DIST_EXTRA_CONFIG: built in ROOT/build"
    wheels = list(out.glob("vitscale-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_every_preset_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    def shipped(folder: str, suffix: str) -> set[str]:
        return {n.rsplit("/", 1)[1] for n in names if n.startswith(f"vitscale/{folder}/") and n.endswith(suffix)}

    presets = {p.name for p in (ROOT / "ds_configs").glob("*.json")}
    configs = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {f"{p}.json" for p in PRESETS} <= presets
    assert configs
    assert shipped("ds_configs", ".json") == presets
    assert shipped("configs", ".yaml") == configs
    assert "vitscale/train/__main__.py" in names


CHECK_INSTALLED = """
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
import vitscale
from vitscale.config import find_preset

assert Path(vitscale.__file__).resolve().is_relative_to(site), f"vitscale imported from {vitscale.__file__}"
for name in sys.argv[2:]:
    path = find_preset(name).resolve()
    assert path.is_relative_to(site / "vitscale"), f"preset {name} resolved to {path}, outside {site}"
    assert path.name == name + ".json", path
"""

# The shipped tiny config (by name), two steps with each shipped preset, in one process group:
# what `vitscale-train vit_tiny parallel.ds_preset=...` runs (train.setup), from the installed copy.
TRAIN_INSTALLED = """
import math, os, sys
from vitscale.distributed import init_distributed, shutdown
from vitscale.train.loop import train
from vitscale.train.setup import plan_run, start_run

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
before = {k: os.environ.get(k) for k in KEYS}
dims = init_distributed()
for preset in sys.argv[1:]:
    zero = 3 if preset.startswith("zero3") else int(preset[4])
    plan = plan_run("vit_tiny", [f"parallel.ds_preset={preset}", f"parallel.zero={zero}", "train.steps=2",
                                 "log.every=1", "model.depth=1", "data.num_workers=0", "log.progress=false",
                                 "checkpoint.at_end=false", f"run.dir=runs/{preset}"], world_size=1)
    last = train(start_run(plan, dims))
    assert last["step"] == 2 and math.isfinite(last["loss"]), (preset, last)
    print("trained", preset, plan.ds_config["zero_optimization"])
shutdown()
assert {k: os.environ.get(k) for k in KEYS} == before, "the single-process start left its rank / port in os.environ"
init_distributed()  # a second start in the same process: a new group
shutdown()
"""


def test_installed_wheel_finds_its_presets(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    shipped = sorted(p.stem for p in (site / "vitscale" / "ds_configs").glob("*.json"))
    assert set(PRESETS) <= set(shipped), shipped
    assert (site / "vitscale" / "configs" / "vit_tiny.yaml").is_file()

    workdir = tmp_path / "elsewhere"  # not ROOT: nothing of the source tree on sys.path or next to cwd
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CHECK_INSTALLED, str(site), *shipped], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"installed copy:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", TRAIN_INSTALLED, *shipped], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"training from the installed copy:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("trained")] == shipped
    assert "offload_param" in proc.stdout  # zero3_offload's preset reached DeepSpeed
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == shipped
