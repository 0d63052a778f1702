"""``vitscale-recipe synthetic-scaling`` (issue 24): the data-law fits of its table, recovered from points
generated from a known law, the images a curve needs to reach scratch, and a rerun that skips finished
points. (Its runs are the FDSL recipe's, end to end in tests/tools/test_recipe.py.)"""
import argparse
import json

import numpy as np
import pytest

from vitscale.tools.synthetic_scaling import fit_curves, images_to_reach, point_name, run, write_report

B, BETA, E = 30.0, 0.5, 0.4  # test loss = 30 / D^0.5 + 0.4


def _rows(noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"size": "ti", "params": 500000, "generator": "scratch", "classes": 0, "instances": 0, "images": 0,
             "seed": 0, "pretrain_steps": 0, "pretrain_loss": "", "finetune_steps": 9, "loss": 1.0, "top1": 70.0,
             "top1_error": 0.3}]
    for d in (500, 1000, 2000, 4000, 8000, 16000, 32000, 64000):
        loss = (B / d**BETA + E) * np.exp(noise * rng.standard_normal())
        err = (5.0 / d**0.3 + 0.05) * np.exp(noise * rng.standard_normal())
        rows.append({"size": "ti", "params": 500000, "generator": "fractal", "classes": 100, "instances": 10,
                     "images": d, "seed": 0, "pretrain_steps": d // 64, "pretrain_loss": 3.0, "finetune_steps": 9,
                     "loss": float(loss), "top1": float(100 * (1 - err)), "top1_error": float(err)})
    return rows


def test_the_data_law_is_recovered_with_intervals(tmp_path):
    rows = _rows()
    fits = fit_curves(rows, tmp_path, resamples=20, ys=("loss",))  # the fitter's own tests: tests/tools/test_fit.py
    assert [f["y"] for f in fits] == ["loss"]
    loss = fits[0]["fit"]
    for name, truth in (("beta", BETA), ("E", E)):
        lo, hi = loss["ci95"][name]
        assert lo <= truth <= hi, (name, loss["params"][name], lo, hi)
    assert loss["params"]["beta"] == pytest.approx(BETA, abs=0.1)
    md = write_report(tmp_path, rows, fits, "cmd").read_text()
    # scratch's loss 1.0 = 30 / D^0.5 + 0.4 at D = (30 / 0.6)^2 = 2,500 images
    need = images_to_reach(loss["params"], 1.0)
    assert need == pytest.approx(2500, rel=0.25)
    assert f"reached after {need:,.0f} synthetic images" in md
    assert (tmp_path / "synthetic_scaling.csv").read_text().count("\n") == len(rows) + 1


def test_a_flat_curve_is_not_reported_as_a_gain(tmp_path):
    # a fit whose beta interval reaches 0 (as a curve without a trend gives): no images-to-reach claim
    fit = {"params": {"B": 0.01, "beta": 0.05, "E": 1.5}, "ci95": {"B": [0.0, 0.1], "beta": [-0.2, 0.4],
                                                                   "E": [1.4, 1.6]},
           "points": 8, "rms_log_residual": 0.01}
    md = write_report(tmp_path, _rows(), [{"size": "ti", "classes": 100, "instances": 10, "y": "loss", "fit": fit}],
                      "cmd").read_text()
    assert "no decrease with more synthetic images is resolved" in md and "reached after" not in md


def test_a_rerun_skips_finished_points_and_refuses_bad_axes(tmp_path):
    args = argparse.Namespace(generator="fractal", images="100,200,300", instances="10", classes="100",
                              sizes="ti", depth=1, finetune_steps=2, seeds=1, seed=0, out=tmp_path, bootstrap=10)
    rows = _rows()
    rows = [rows[0]] + [{**r, "images": n} for r, n in zip(rows[1:], (100, 200, 300))]  # 3 counts: no fit
    for r in rows:  # every point finished before: nothing may train
        folder = tmp_path / "runs" / point_name("ti", r["classes"], r["instances"], r["images"], 0)
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps(r) + "\n")
    assert run(args, "cmd") == 0
    import torch.distributed as dist

    # nothing trained, so no process group started in this (pytest's) process: one would hold its port and
    # MASTER_PORT for every later run the tests launch
    assert not (dist.is_available() and dist.is_initialized())
    assert not any((tmp_path / "runs").glob("*/pretrain")) and not any((tmp_path / "runs").glob("*/finetune"))
    assert "| ti | 0.50 M | fractal | 100 | 10 | 300 |" in (tmp_path / "synthetic_scaling.md").read_text()
    for bad, message in ((dict(classes="10"), "the digits' count"), (dict(images="5,x"), "comma-separated"),
                         (dict(generator="nope"), "choose one of"), (dict(sizes="xl"), "choose from")):
        with pytest.raises(ValueError, match=message):
            run(argparse.Namespace(**{**vars(args), **bad}), "cmd")
