"""``vitscale-recipe fdsl-transfer --quick`` end to end (issue 10): pre-training on synthetic
sources, fine-tuning on digits from their checkpoints, the table, CSV and PNG it writes with
every number read back from the runs; the fine-tuned model starts from the checkpoint's
backbone exactly, with a new head; ``vitscale-eval --task linear-probe`` on a run."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import BIN, ROOT, read_metrics
from vitscale.experiment import load_experiment
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint
from vitscale.train.engine import build_model


PRE, FINE = 24, 30  # --steps: fixed step counts (the quick plan's model)


def run_recipe(out, *extra):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    proc = subprocess.run([str(BIN / "vitscale-recipe"), "fdsl-transfer", "--quick", "--steps", f"{PRE},{FINE}",
                           "--out", str(out), "--generators", "scratch,dead_leaves,fractal", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("fdsl")
    return out, run_recipe(out).stdout


def test_quick_recipe_writes_the_table_from_its_runs(recipe):
    out, stdout = recipe
    rows = list(csv.DictReader(open(out / "fdsl_transfer.csv")))
    assert [r["pretraining"] for r in rows] == ["Scratch", "Dead leaves", "FractalDB"]
    markdown = (out / "fdsl_transfer.md").read_text()
    assert "| Pre-training | top-1 | top-5 |" in markdown and markdown in stdout
    for row in rows:
        tuned = read_metrics(out / "runs" / f"finetune_{row['source']}")
        last_eval = [r for r in tuned if r["kind"] == "eval"][-1]
        assert float(row["top1"]) == pytest.approx(last_eval["top1"]) and 0 <= last_eval["top1"] <= 100
        assert float(row["top5"]) == pytest.approx(last_eval["top5"]) and last_eval["top5"] >= last_eval["top1"]
        assert last_eval["test_samples"] == 360 and last_eval["step"] == int(row["finetune_steps"]) == FINE
        assert len([r for r in tuned if r["kind"] == "eval"]) == 2  # during (half-way) and after training
        assert 0 < last_eval["loss"] < 2 * 2.303  # the test cross-entropy (the sweep's eval_loss); ln 10 = chance
        assert f"| {row['pretraining']} | {float(row['top1']):.1f} | {float(row['top5']):.1f} |" in markdown
        if row["source"] == "scratch":
            assert row["pretrain_steps"] == "0" and row["pretrain_loss"] == ""
        else:
            pre = [r for r in read_metrics(out / "runs" / f"pretrain_{row['source']}") if r["kind"] == "train"]
            assert pre[-1]["step"] == int(row["pretrain_steps"]) == PRE
            assert float(row["pretrain_loss"]) == pytest.approx(pre[-1]["loss"])
    with Image.open(out / "fdsl_transfer.png") as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 100


def test_seeds_give_a_mean_and_a_t_interval_and_the_order_is_compared_with_the_paper():
    from scipy import stats

    from vitscale.tools.fdsl_transfer import aggregate, order_against_published

    def row(source, top1, loss):
        return {"pretraining": source, "source": source, "top1": top1, "top5": 99.0, "pretrain_loss": loss}

    fractal = aggregate([row("fractal", 80.0, 1.0), row("fractal", 84.0, 2.0), row("fractal", 88.0, 4.5)], classes=100)
    assert fractal["top1"] == pytest.approx(84.0) and fractal["seeds"] == 3
    # an independent interval: scipy's t-interval of the three values
    low, high = stats.t.interval(0.95, 2, loc=84.0, scale=stats.sem([80.0, 84.0, 88.0]))
    assert (fractal["top1_ci95_low"], fractal["top1_ci95_high"]) == pytest.approx((low, high))
    assert fractal["left_chance"] is False  # one seed's 4.5 is above 0.9 x ln 100 = 4.14
    scratch = aggregate([row("scratch", 60.0, None), row("scratch", 62.0, None), row("scratch", 61.0, None)], 100)
    assert scratch["left_chance"] is None and scratch["pretrain_loss"] is None
    perlin = aggregate([row("perlin", 90.0, 0.1), row("perlin", 70.0, 0.1), row("perlin", 83.0, 0.2)], 100)
    (line,) = order_against_published([scratch, perlin, fractal])
    # the paper: scratch < perlin < fractal; here perlin (81.0) < fractal (84.0), both above scratch
    # scratch [58.5, 63.5] and fractal [74.1, 93.9] are separated; perlin's wide interval overlaps both
    assert "3 of 3 ordered pairs agree; 2 of them are not separated" in line and "reversed" not in line
    (line,) = order_against_published([scratch, {**perlin, "top1": 85.0}, fractal])
    assert "2 of 3 ordered pairs agree" in line and "reversed here: fractal < perlin (within the intervals)." in line


@pytest.mark.parametrize("args, message", [(["--steps", "5"], "give two integers"), (["--steps", "0,10"], "at least 1"),
                                           (["--steps", "5,5", "--part", "3/3"], "0 <= I < N"),
                                           (["--part", "0/2"], "--part needs --steps")])
def test_bad_step_counts_and_parts_are_refused_before_any_run(args, message, capsys):
    from vitscale.tools.recipe import main

    with pytest.raises(SystemExit) as exit_:
        main(["fdsl-transfer", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_finetuning_restores_the_backbone_and_replaces_only_the_head(recipe):
    out, _ = recipe
    exp = load_experiment(out / "runs" / "finetune_fractal" / "config.yaml")  # the resolved config, model.init kept
    cfg = exp.cfg
    pre_dir = out / "runs" / "pretrain_fractal"
    assert cfg.model.init == str(pre_dir)
    pretrained = read_checkpoint(find_checkpoint(pre_dir)[0], load_run(pre_dir))
    model = build_model(exp)  # what the fine-tuning run started from
    start = model.state_dict()
    assert set(start) == set(pretrained)
    for key, value in start.items():
        if key.startswith("head."):
            assert value.shape[0] == cfg.data.num_classes != pretrained[key].shape[0]
        else:
            torch.testing.assert_close(value, pretrained[key].float(), rtol=0, atol=0, msg=key)
    cfg.model.init = None
    fresh = build_model(exp).state_dict()  # the head is the run's own seeded initialisation
    torch.testing.assert_close(start["head.weight"], fresh["head.weight"], rtol=0, atol=0)
    assert not torch.equal(start["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])


def test_linear_probe_on_frozen_features(recipe, tmp_path):
    out, _ = recipe
    proc = subprocess.run([sys.executable, "-m", "vitscale.tools.eval", str(out / "runs" / "pretrain_fractal"),
                           "--task", "linear-probe", "--data", "digits", "--out", str(tmp_path / "probe.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert (result["train_samples"], result["test_samples"], result["feature_dim"]) == (1437, 360, 192)
    # chance is 10 %; measured 84 % (top-5 99 %): a probe that learned nothing, or features that carry
    # nothing of the image (a broken embed), stays near chance
    assert 50 <= result["top1"] <= result["top5"] <= 100
    proc = subprocess.run([sys.executable, "-m", "vitscale.tools.eval", str(out / "runs" / "pretrain_fractal"),
                           "--task", "linear-probe", "--data", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "--test-data" in proc.stderr


def test_a_rerun_skips_the_finished_runs_and_retrains_the_rest(recipe):  # last: it retrains two runs
    out, stdout = recipe
    runs = out / "runs"
    first = {p.parent.name: p.read_bytes() for p in runs.glob("*/metrics.jsonl")}
    assert len(first) == 5  # two pre-trainings, three fine-tunings
    (runs / "finetune_scratch" / "recipe_done.json").unlink()  # as if it had been interrupted
    marker = runs / "finetune_fractal" / "recipe_done.json"  # finished, but with other overrides
    done = json.loads(marker.read_text())
    marker.write_text(json.dumps({**done, "overrides": [*done["overrides"][:-1], "train.seed=7"]}))
    again = run_recipe(out)
    assert again.stdout == stdout  # the same table: the same seed trains the same runs
    for name, before in first.items():
        after = (runs / name / "metrics.jsonl").read_bytes()
        assert (after == before) == (name not in ("finetune_scratch", "finetune_fractal")), name
        assert json.loads((runs / name / "recipe_done.json").read_text())["overrides"][-1] == f"run.dir={runs / name}"
    assert again.stderr.count("finished before with these overrides; skipped") == 3
