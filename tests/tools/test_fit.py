"""vitscale-fit against points drawn from known laws with 2 % multiplicative noise (an independent
reference: the truth is the generator's, not the fitter's): the parameters come back within their
bootstrap intervals and the exponents within 0.05; the compute-optimal point follows the closed form;
bad input fails early, naming the column or the count."""
import csv
import json

import numpy as np
import pytest

from vitscale.tools import fit

CHINCHILLA = {"A": 420.0, "alpha": 0.34, "B": 410.0, "beta": 0.28, "E": 1.69}


def write_points(path, rows, columns=("params", "samples", "loss")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, "note"])
        w.writerows([[*r, "ignored"] for r in rows])
    return path


def chinchilla_points(rng, p=CHINCHILLA, noise=0.02, per_axis=8):
    return [(n, d, (p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"] + p["E"]) * (1 + noise * rng.standard_normal()))
            for n in np.geomspace(1e6, 3e9, per_axis) for d in np.geomspace(1e7, 3e11, per_axis)]


def assert_recovered(result, truth, exponents):
    for k, v in truth.items():
        lo, hi = result["ci95"][k]
        assert lo <= v <= hi, f"{k}: true {v} outside the 95% interval [{lo}, {hi}] (fit {result['params'][k]})"
    for k in exponents:
        assert abs(result["params"][k] - truth[k]) <= 0.05, (k, result["params"][k], truth[k])


def test_chinchilla_law_recovered_with_intervals(tmp_path):
    csv_path = write_points(tmp_path / "pts.csv", chinchilla_points(np.random.default_rng(3)))
    result = fit.run_fit(csv_path, "chinchilla", tmp_path / "out", resamples=40)
    assert_recovered(result, CHINCHILLA, ["alpha", "beta"])
    assert abs(result["params"]["E"] / CHINCHILLA["E"] - 1) < 0.05
    saved = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert saved["law"] == "chinchilla" and saved["params"] == pytest.approx(result["params"])
    assert (tmp_path / "out" / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_and_power_laws_recovered(tmp_path):
    rng = np.random.default_rng(5)
    d = np.geomspace(1e6, 1e11, 16)
    B, beta, E = 60.0, 0.25, 1.2
    write_points(tmp_path / "d.csv", [(x, (B / x**beta + E) * (1 + 0.02 * rng.standard_normal())) for x in d],
                 ("samples", "loss"))
    result = fit.run_fit(tmp_path / "d.csv", "data", tmp_path / "d", resamples=40)
    assert_recovered(result, {"B": B, "beta": beta, "E": E}, ["beta"])
    # a power law in another column (e.g. the best learning rate against width), y named by --y
    w = np.geomspace(64, 4096, 12)
    write_points(tmp_path / "p.csv", [(x, 0.5 / x**0.6 * (1 + 0.02 * rng.standard_normal())) for x in w],
                 ("width", "best_lr"))
    result = fit.run_fit(tmp_path / "p.csv", "power", tmp_path / "p", x_cols=["width"], y_col="best_lr",
                         resamples=40)
    assert_recovered(result, {"A": 0.5, "alpha": 0.6}, ["alpha"])
    assert "E" not in result["params"]


def test_sweep_csv_budget_uses_the_flops_column(tmp_path, caplog):
    """A sweep.csv: train_loss is the default y, and the FLOPs per sample per parameter come from its flops
    column (here 3 x 2 x 65 tokens = 390, as a ViT's forward is about 2 N FLOPs per token), not 6."""
    rng = np.random.default_rng(7)
    rows = [{"train.lr": 1e-3, "run": f"r{i}", "params": n, "samples": d, "flops": 390 * n * d, "train_loss": loss}
            for i, (n, d, loss) in enumerate(chinchilla_points(rng, per_axis=5))]
    with open(tmp_path / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert fit.main([str(tmp_path), "--budget", "1e21", "--bootstrap", "20", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert result["y"] == "train_loss"
    opt = result["compute_optimal"]
    assert opt["flops_from"] == "data" and opt["flops_per_sample_param"] == pytest.approx(390)
    assert 390 * opt["params"] * opt["samples"] == pytest.approx(1e21)
    p = result["params"]  # at the optimum, dL/dN x N = dL/dD x D (the Lagrange condition of C = k N D)
    assert p["alpha"] * p["A"] / opt["params"] ** p["alpha"] == pytest.approx(p["beta"] * p["B"] / opt["samples"] ** p["beta"])


def test_bad_input_fails_early(tmp_path, caplog):
    write_points(tmp_path / "few.csv", [(1e6, 1e8, 3.0), (1e7, 1e9, 2.5)])
    with pytest.raises(ValueError, match=r"2 usable point\(s\); the chinchilla law has 5 parameters"):
        fit.run_fit(tmp_path / "few.csv", "chinchilla", tmp_path / "o")
    with pytest.raises(ValueError, match=r"has no column 'tokens' \(it has params, samples, loss, note\)"):
        fit.run_fit(tmp_path / "few.csv", "chinchilla", tmp_path / "o", x_cols=["params", "tokens"])
    with pytest.raises(ValueError, match=r"the data law .* takes 1 column"):
        fit.run_fit(tmp_path / "few.csv", "data", tmp_path / "o", x_cols=["params", "samples"])
    assert fit.main([str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.csv does not exist" in caplog.text
