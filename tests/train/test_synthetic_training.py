"""The tiny ViT trains from ``vitscale-synth`` shards and from generators on the fly."""
import json
import subprocess

import pytest

from tests.conftest import BIN, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

COMMON = ["train.steps=6", "log.every=1", "model.depth=2", "train.micro_batch=8", "train.global_batch=16",
          "checkpoint.at_end=false", "data.num_workers=1", "data.num_classes=4"]


@pytest.fixture(scope="module")
def fractal_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fractal_shards")
    subprocess.run([str(BIN / "vitscale-synth"), "fractal", "--classes", "4", "--instances", "12", "--size", "64",
                    "--shard-size", "8", "--seed", "5", "--out", str(out), "--param", "num_points=5000",
                    "--no-progress"], check=True, capture_output=True, text=True, timeout=300)
    return out


def test_trains_from_generated_shards(fractal_shards, tmp_path):
    info = json.loads((fractal_shards / "dataset.json").read_text())
    assert (info["generator"], info["classes"], info["num_samples"]) == ("fractal", 4, 48)
    run_training(tmp_path, COMMON + [f"data.source={fractal_shards}", "data.shuffle_buffer=16"], nprocs=2)
    losses = train_losses(tmp_path)
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    assert f"source: {fractal_shards}" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("generator", ["rcdb", "visual_atom"])
def test_trains_on_the_fly(generator, tmp_path):
    run_training(tmp_path, COMMON + [f"data.source={generator}", "data.params={orbits: 20}"
                                     if generator == "visual_atom" else "data.params={}"], launcher="python", nprocs=1)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["loss"] > 0 for r in rows)


def test_a_missing_shard_folder_is_refused_before_start(tmp_path):
    proc = run_training(tmp_path / "run", COMMON + [f"data.source={tmp_path}/nope/"], launcher="python", nprocs=1,
                        check=False)
    assert proc.returncode == 2
    assert "data.source" in proc.stderr and "nope" in proc.stderr


def test_a_class_count_that_disagrees_with_the_shards_is_refused(fractal_shards, tmp_path):
    proc = run_training(tmp_path / "run", COMMON + [f"data.source={fractal_shards}", "data.num_classes=7"],
                        launcher="python", nprocs=1, check=False)
    assert proc.returncode == 2
    assert "data.num_classes=7 but the shards hold 4 classes" in proc.stderr
