"""``vitscale-recipe vit-l-search`` (issue 24): the points it makes, the analysis of a sweep table
generated from a known optimum-LR law, and the SLURM array it emits. (The runs themselves go through
``tools/grid.py``, whose resume and table are tested in tests/tools/test_grid.py.)"""
import math

import numpy as np
import pytest

from vitscale.config import ConfigError
from vitscale.tools.lr_search import SIZES, analyse, points, search_space, write_report

WIDTHS = {"ti": 192, "s": 384, "b": 768}
TRUE_ALPHA, TRUE_C = 0.5, 0.25  # the generator's optimum: lr* = 0.25 / width^0.5


def _table(alpha=TRUE_ALPHA, lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), noise=0.0, seed=0):
    """sweep.csv-like rows: loss = 1 + (log10 lr - log10 lr*)^2 (+ 0.3 at the worse batch), per size."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, width in WIDTHS.items():
        lr_star = TRUE_C / width**alpha
        for batch, penalty in (("32", 0.0), ("64", 0.3)):
            for lr in lrs:
                loss = 1 + (math.log10(lr) - math.log10(lr_star)) ** 2 + penalty + noise * rng.standard_normal()
                rows.append({"size": size, "train.lr": str(lr), "train.global_batch": batch,
                             "params": str(width * 1000), "train_loss": str(loss)})
    return rows


def test_the_optimum_lr_and_its_law_in_width_are_recovered(tmp_path):
    rows = _table(noise=0.005)
    best = analyse(rows, "train_loss", WIDTHS, ["train.global_batch"])
    assert [b["size"] for b in best] == ["ti", "s", "b"]
    for b in best:
        truth = TRUE_C / b["width"] ** TRUE_ALPHA
        assert b["train.global_batch"] == "32" and b["edge"] == ""  # the worse batch is not chosen
        assert b["lr_opt"] == pytest.approx(truth, rel=0.05)  # between grid values, not the nearest one
        assert min(abs(math.log(b["lr_opt"] / float(lr))) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)) > 0.05
    report = write_report(tmp_path, best, "train_loss", ["train.global_batch"], "vitscale-recipe vit-l-search", rows)
    fit = report["fit"]
    assert fit["params"]["alpha"] == pytest.approx(TRUE_ALPHA, abs=0.05)
    lo, hi = fit["ci95"]["alpha"]
    assert lo <= TRUE_ALPHA <= hi
    md = (tmp_path / "lr_search.md").read_text()
    assert "the optimum LR falls with width" in md and "| b | 768 |" in md
    assert (tmp_path / "lr_search.png").stat().st_size > 1000 and (tmp_path / "lr_fit" / "fit.json").is_file()


def test_no_shift_is_not_reported_as_one(tmp_path):
    rows = _table(alpha=0.0, noise=0.02)
    best = analyse(rows, "train_loss", WIDTHS, ["train.global_batch"])
    write_report(tmp_path, best, "train_loss", ["train.global_batch"], "cmd", rows)
    assert "falls with width" not in (tmp_path / "lr_search.md").read_text()


def test_an_optimum_at_the_grids_edge_is_said_to_be_one():
    rows = _table(lrs=(1e-5, 3e-5, 1e-4))  # every size's optimum (0.009 .. 0.018) lies above the grid
    best = analyse(rows, "train_loss", WIDTHS, ["train.global_batch"])
    assert all(b["edge"] == "high" and b["lr_opt"] == pytest.approx(1e-4) for b in best)


def test_seeds_are_averaged_before_the_best_is_chosen():
    rows = [{"size": "ti", "train.lr": lr, "params": "1", "train_loss": loss, "train.global_batch": "32"}
            for lr, loss in (("1e-3", "1.0"), ("1e-3", "3.0"), ("3e-3", "1.5"), ("3e-3", "1.7"))]
    (best,) = analyse(rows, "train_loss", {"ti": 192}, ["train.global_batch"])
    assert best["best_lr"] == 3e-3 and best["train_loss"] == pytest.approx(1.6) and best["seeds"] == 2


def test_points_set_each_size_and_a_micro_batch_that_divides_every_batch():
    space = search_space("ti,b", "1e-3,3e-3", "24,64", "5", "0.05", ["optim.name=adamw,lion"], depth=2,
                         seeds=None, base_seed=0)
    pts = points(space, micro_batch=16)
    assert len(pts) == 2 * 2 * 2 * 2
    first = pts[0]
    assert first.name.startswith("size=ti,lr=1e-3")
    assert first.overrides[:3] == [f"model.name={SIZES['ti'][0]}", "model.num_heads=3", "model.depth=2"]
    assert "train.micro_batch=8" in first.overrides  # gcd(16, 24, 64)
    assert {p.overrides[0] for p in pts} == {"model.name=vit_tiny_patch16", "model.name=vit_base_patch16"}
    for bad, message in ((dict(sizes="ti,xl"), "choose from"), (dict(extra=["model.depth=2,4"]), "the recipe sets"),
                         (dict(extra=["train.lr=1,2"]), "the recipe sets")):
        args = dict(sizes="ti", lr="1e-3", batch="32", warmup="5", wd="0.05", extra=[], depth=None, seeds=None,
                    base_seed=0)
        with pytest.raises(ConfigError, match=message):
            search_space(**{**args, **bad})


def test_emit_sbatch_prints_one_array_job_of_every_point(capsys, tmp_path):
    from vitscale.tools.recipe import main

    assert main(["vit-l-search", "--sizes", "ti,s", "--lr", "1e-3,3e-3", "--depth", "1", "--emit-sbatch",
                 "--out", str(tmp_path / "search"), "train.steps=5"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in script
    assert script.count(") point=size=") == 4 and "model.name=vit_small_patch16" in script
    assert "train.steps=5" in script and not (tmp_path / "search" / "sweep.csv").exists()
