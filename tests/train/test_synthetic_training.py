"""The tiny ViT trains from ``vitscale-synth`` shards and from generators on the fly: on a set small
enough to memorise in a few steps (8 images, no augmentation, a constant lr), the loss must fall
well below chance, so a loader that feeds wrong labels, noise or the same image every time fails."""
import json
import math
import subprocess

import pytest

from tests.conftest import BIN, read_metrics, run_training, train_losses

pytestmark = pytest.mark.distributed

STEPS = 20
COMMON = [f"train.steps={STEPS}", "log.every=1", "model.depth=2", "train.micro_batch=8", "checkpoint.at_end=false",
          "data.num_workers=1", "data.num_classes=4", "optim.schedule=constant", "optim.warmup_steps=2",
          "train.lr=2e-3"]
CHANCE = math.log(4)


def _learned(losses: list[float]) -> bool:
    """Memorised: the last steps well below the chance loss (measured: 0.05-0.95 vs ln 4 = 1.39)."""
    return len(losses) == STEPS and min(losses[-4:]) < 0.8 * CHANCE and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def fractal_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fractal_shards")
    subprocess.run([str(BIN / "vitscale-synth"), "fractal", "--classes", "4", "--instances", "2", "--size", "64",
                    "--shard-size", "4", "--seed", "5", "--out", str(out), "--param", "num_points=5000",
                    "--no-progress"], check=True, capture_output=True, text=True, timeout=300)
    return out


def test_trains_from_generated_shards(fractal_shards, tmp_path):
    info = json.loads((fractal_shards / "dataset.json").read_text())
    assert (info["generator"], info["classes"], info["num_samples"]) == ("fractal", 4, 8)
    run_training(tmp_path, COMMON + [f"data.source={fractal_shards}", "data.shuffle_buffer=16", "data.augment=false",
                                     "train.global_batch=16"], nprocs=2)
    losses = train_losses(tmp_path)
    assert _learned(losses), losses
    assert f"source: {fractal_shards}" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("generator", ["rcdb", "visual_atom"])
def test_trains_on_the_fly(generator, tmp_path):
    run_training(tmp_path, COMMON + [f"data.source={generator}", "data.instances=2", "train.global_batch=8",
                                     "data.params={orbits: 20}" if generator == "visual_atom" else "data.params={}"],
                 launcher="python", nprocs=1)
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert _learned([r["loss"] for r in rows]), [r["loss"] for r in rows]


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
