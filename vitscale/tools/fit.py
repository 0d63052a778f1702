"""``vitscale-fit SWEEP_DIR_OR_CSV --law chinchilla|data|power [--x params,samples] [--y loss] --out DIR``.

Fits a scaling law to (size, data, loss) points and writes ``fit.json`` and ``fit.png`` into ``--out``:

- ``chinchilla``: L(N, D) = A / N^alpha + B / D^beta + E (Hoffmann et al. 2022, eq. 2),
- ``data``: L(D) = B / D^beta + E (the model fixed, data scaled),
- ``power``: L(x) = A / x^alpha (one variable, no floor; e.g. the best LR against width).

As the Chinchilla paper (appendix D.2) does, the law is fitted in log space with the
log-sum-exp parametrisation, A = e^a, B = e^b, E = e^e:

    minimise  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3

with L-BFGS (scipy) from a grid of initialisations (the paper's grid: alpha, beta in 0 .. 2,
e in -1 .. 1, a, b in 0 .. 25); the grid is scored in one vectorised pass and the best starts
are refined. 95 % intervals come from a bootstrap: the points resampled with replacement and
refitted (warm-started from the best fit) ``--bootstrap`` times.

The input is a CSV with a header (``vitscale-sweep``'s ``sweep.csv``, or any stack's results:
columns ``params,samples,loss`` by default, extra columns ignored; rows whose x or y cell is
blank are left out and counted), or a sweep folder holding ``sweep.csv``. A sweep.csv has no
``loss`` column; its final training loss, ``train_loss``, is then the default ``--y``.

``--budget FLOPS`` (chinchilla law) adds the compute-optimal N and D for that training budget:
with C = k N D, minimising L(N, D) gives N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = (C/k) / N_opt,
G = (alpha A / (beta B))^(1/(alpha+beta)). k, the training FLOPs per sample per parameter, is read
from the points when the CSV has a ``flops`` column (the stack's exact count: ``sweep.csv``'s
FLOPs are 3 x the forward FLOPs of ``models/flops.py`` per sample, attention included); without
one the fit says so and uses k = 6 (6ND, Kaplan et al. 2020), a language-model token count that is
not a ViT sample's.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitscale.files import replacing, write_text_atomic

logger = logging.getLogger(__name__)

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2
SIX_ND = 6.0  # training FLOPs per token per parameter of a dense LM (Kaplan et al. 2020): the fallback k


@dataclass(frozen=True)
class Law:
    """A law as log L = LSE(scale_i - exponent_i log x_i [, e]) over its terms."""

    name: str
    formula: str
    terms: tuple[tuple[str, str], ...]  # (scale, exponent) per x variable, e.g. ("A", "alpha")
    floor: bool  # has the irreducible loss E
    default_x: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """Parameter names in the order of the vector theta: log scales, exponents, log E."""
        return [s for s, _ in self.terms] + [x for _, x in self.terms] + (["E"] if self.floor else [])


LAWS = {
    "chinchilla": Law("chinchilla", "L(N, D) = A / N^alpha + B / D^beta + E", (("A", "alpha"), ("B", "beta")), True,
                      ("params", "samples")),
    "data": Law("data", "L(D) = B / D^beta + E", (("B", "beta"),), True, ("samples",)),
    "power": Law("power", "L(x) = A / x^alpha", (("A", "alpha"),), False, ("params",)),
}


# --------------------------------------------------------------------------- the objective


def predict_log(law: Law, theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
    """log L at the points.

    Args:
        law: the law.
        theta: (K, P) or (P,) parameter vectors (log scales, exponents, log E).
        logx: (n, m) natural logs of the x columns.

    Returns:
        (K, n) or (n,) predicted log-losses.
    """
    t = np.atleast_2d(theta)
    m = len(law.terms)
    z = t[:, None, :m] - t[:, None, m:2 * m] * logx[None, :, :]  # (K, n, m)
    if law.floor:
        z = np.concatenate([z, np.broadcast_to(t[:, None, 2 * m:], z.shape[:2] + (1,))], axis=2)
    out = np.logaddexp.reduce(z, axis=2)
    return out if np.ndim(theta) == 2 else out[0]


def _objective(theta: np.ndarray, law: Law, logx: np.ndarray, logy: np.ndarray, weight: np.ndarray
               ) -> tuple[float, np.ndarray]:
    """The weighted Huber loss of the log residuals and its gradient (the terms' softmax weights)."""
    m = len(law.terms)
    z = theta[:m] - theta[m:2 * m] * logx  # (n, m)
    if law.floor:
        z = np.concatenate([z, np.full((len(logx), 1), theta[-1])], axis=1)
    lse = np.logaddexp.reduce(z, axis=1)
    r = lse - logy
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    dr = weight * np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # dHuber/dr
    soft = np.exp(z - lse[:, None])  # (n, terms): d lse / d z
    grad = np.empty_like(theta)
    grad[:m] = dr @ soft[:, :m]
    grad[m:2 * m] = -(dr[:, None] * soft[:, :m] * logx).sum(axis=0)
    if law.floor:
        grad[-1] = dr @ soft[:, -1]
    return float(weight @ loss), grad


def initial_grid(law: Law) -> np.ndarray:
    """The Chinchilla paper's grid of starts: exponents 0 .. 2 by 0.5, log scales 0 .. 25 by 5, log E -1 .. 1 by 0.5."""
    m = len(law.terms)
    axes = [np.arange(0, 26, 5.0)] * m + [np.arange(0, 2.01, 0.5)] * m
    if law.floor:
        axes.append(np.arange(-1, 1.01, 0.5))
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def _minimise(theta0: np.ndarray, law: Law, logx: np.ndarray, logy: np.ndarray, weight: np.ndarray,
              maxiter: int = 1000) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(_objective, theta0, args=(law, logx, logy, weight), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter, "gtol": 1e-10, "ftol": 1e-13})
    return res.x


def fit_theta(law: Law, logx: np.ndarray, logy: np.ndarray, weight: np.ndarray | None = None,
              starts: np.ndarray | None = None, refine: int = 12) -> np.ndarray:
    """The parameter vector minimising the Huber objective.

    Args:
        law: the law.
        logx: (n, m) logs of the x columns; logy: (n,) logs of the losses.
        weight: per-point multiplicity (the bootstrap's resampling counts); None = 1 each.
        starts: (K, P) initialisations; None = ``initial_grid``. All are scored at once, the
            ``refine`` best get 100 L-BFGS iterations each, and the best of those is run to convergence
            (most starts of the paper's grid are far off: running each to convergence costs seconds).

    Returns:
        (P,) the best vector found.
    """
    weight = np.ones(len(logy)) if weight is None else weight
    starts = initial_grid(law) if starts is None else np.atleast_2d(starts)

    def score(thetas: np.ndarray) -> np.ndarray:
        r = predict_log(law, thetas, logx) - logy[None, :]
        a = np.abs(r)
        return np.where(a <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (a - 0.5 * HUBER_DELTA)) @ weight

    short = np.stack([_minimise(starts[i], law, logx, logy, weight, maxiter=100)
                      for i in np.argsort(score(starts))[:refine]])
    return _minimise(short[np.argmin(score(short))], law, logx, logy, weight)


def to_params(law: Law, theta: np.ndarray) -> dict[str, float]:
    """The law's parameters (A, alpha, ...) from a parameter vector (log scales exponentiated)."""
    m = len(law.terms)
    out = {}
    for i, (scale, exponent) in enumerate(law.terms):
        out[scale] = float(np.exp(theta[i]))
        out[exponent] = float(theta[m + i])
    if law.floor:
        out["E"] = float(np.exp(theta[-1]))
    return out


def bootstrap(law: Law, logx: np.ndarray, logy: np.ndarray, theta: np.ndarray, resamples: int,
              seed: int = 0) -> np.ndarray:
    """(resamples, P) refits on points drawn with replacement, each warm-started from ``theta``."""
    rng = np.random.default_rng(seed)
    n = len(logy)
    out = np.empty((resamples, len(theta)))
    for k in range(resamples):
        weight = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        out[k] = _minimise(theta, law, logx, logy, weight)
    return out


def compute_optimal(params: dict[str, float], budget_flops: float, flops_per_sample_param: float) -> dict[str, float]:
    """N_opt and D_opt minimising A/N^alpha + B/D^beta + E subject to k N D = C (module docstring)."""
    A, alpha, B, beta, E = (params[k] for k in ("A", "alpha", "B", "beta", "E"))
    nd = budget_flops / flops_per_sample_param
    g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    n_opt = g * nd ** (beta / (alpha + beta))
    d_opt = nd / n_opt
    return {"budget_flops": budget_flops, "params": n_opt, "samples": d_opt,
            "loss": A / n_opt**alpha + B / d_opt**beta + E}


# --------------------------------------------------------------------------- input


def read_points(source: str | Path, x_cols: list[str], y_col: str | None, law: Law
                ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None, Path]:
    """The points of a CSV or a sweep folder.

    Returns:
        (x (n, m), y (n,), the y column's name, the flops column (n,) or None, the CSV's path).

    Raises:
        ValueError: no such file, missing columns, non-numeric or non-positive cells, too few points.
    """
    path = Path(source)
    if path.is_dir():
        if not (path / "sweep.csv").is_file():
            raise ValueError(f"{path} is a folder without sweep.csv; give a CSV file or a vitscale-sweep --out folder")
        path = path / "sweep.csv"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a CSV file (columns params,samples,loss) or a sweep folder")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    columns = list(rows[0].keys()) if rows else []
    if y_col is None:
        y_col = "loss" if "loss" in columns or "train_loss" not in columns else "train_loss"
    missing = [c for c in [*x_cols, y_col] if c not in columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(repr(c) for c in missing)} (it has "
                         f"{', '.join(columns) or 'no rows'}); name the columns with --x and --y")
    keep = [r for r in rows if all((r[c] or "").strip() for c in [*x_cols, y_col])]
    if len(keep) < len(rows):
        logger.info("fit: %d of %d rows have a blank %s cell and are left out", len(rows) - len(keep), len(rows),
                    "/".join([*x_cols, y_col]))

    def numbers(col: str, rows_: list[dict]) -> np.ndarray:
        try:
            values = np.array([float(r[col]) for r in rows_])
        except ValueError as e:
            raise ValueError(f"{path}: column '{col}' holds a value that is not a number ({e})") from None
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError(f"{path}: column '{col}' must hold positive numbers (a power law takes logs); "
                             f"it holds {values[~(np.isfinite(values) & (values > 0))][0]}")
        return values

    needed = len(law.names) + 1
    if len(keep) < needed:
        raise ValueError(f"{path}: {len(keep)} usable point(s); the {law.name} law has {len(law.names)} parameters "
                         f"({', '.join(law.names)}) and needs at least {needed} points")
    x = np.stack([numbers(c, keep) for c in x_cols], axis=1)
    y = numbers(y_col, keep)
    flops = None
    if "flops" in columns and all((r["flops"] or "").strip() for r in keep):
        flops = numbers("flops", keep)
    return x, y, y_col, flops, path


# --------------------------------------------------------------------------- output


def _curve_groups(other: np.ndarray, most: int = 6) -> list[np.ndarray]:
    """Point indices sharing a value of the other variable, for at most ``most`` values spread over its range."""
    key = np.round(np.log(other), 5)
    values = np.unique(key)
    if len(values) > most:
        values = values[np.unique(np.linspace(0, len(values) - 1, most).round().astype(int))]
    return [np.flatnonzero(key == v) for v in values]


def plot(law: Law, x: np.ndarray, y: np.ndarray, x_cols: list[str], y_col: str, theta: np.ndarray,
         boot: np.ndarray, path: Path, extrapolate: float = 10.0) -> None:
    """``fit.png``: the points, the fitted law through the data's range and ``extrapolate`` times beyond
    it (dashed), and the bootstrap's 95 % band; one panel per x variable, one curve per value of the other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = x.shape[1]
    fig, axes = plt.subplots(1, m, figsize=(6.0 * m, 4.5), squeeze=False)
    for j, ax in enumerate(axes[0]):
        groups = _curve_groups(x[:, 1 - j]) if m == 2 else [np.arange(len(y))]
        ax.scatter(x[:, j], y, s=8, color="0.8", zorder=2)  # points of the values without a curve
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
        grid = np.geomspace(x[:, j].min(), x[:, j].max() * extrapolate, 120)
        for idx, color in zip(groups, colors):
            logx = np.empty((len(grid), m))
            logx[:, j] = np.log(grid)
            label = "points"
            if m == 2:
                held = float(x[idx[0], 1 - j])
                logx[:, 1 - j] = math.log(held)
                label = f"{x_cols[1 - j]} = {held:.3g}"
            fitted = np.exp(predict_log(law, theta, logx))
            band = np.exp(np.percentile(predict_log(law, boot, logx), [2.5, 97.5], axis=0))
            inside = grid <= x[:, j].max()
            ax.scatter(x[idx, j], y[idx], s=14, color=color, label=label, zorder=3)
            ax.plot(grid[inside], fitted[inside], color=color, lw=1.5)
            ax.plot(grid[~inside], fitted[~inside], color=color, lw=1.5, ls="--")
            ax.fill_between(grid, band[0], band[1], color=color, alpha=0.18, lw=0)
        ax.axvline(x[:, j].max(), color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x_cols[j])
        ax.set_ylabel(y_col)
        ax.legend(fontsize=7)
    p = to_params(law, theta)
    fig.suptitle(f"{law.formula}:  " + ", ".join(f"{k} = {v:.4g}" for k, v in p.items())
                 + f"\n(dashed: extrapolation to {extrapolate:g}x; band: bootstrap 95 %)", fontsize=9)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run_fit(source: str | Path, law_name: str, out: str | Path, x_cols: list[str] | None = None,
            y_col: str | None = None, budget_flops: float | None = None, resamples: int = 200,
            seed: int = 0) -> dict:
    """Fit, write ``fit.json`` and ``fit.png`` into ``out``; returns what fit.json holds.

    Raises:
        ValueError: bad input (see ``read_points``), an x column count the law does not take, a budget
            with a law that has no N and D.
    """
    law = LAWS[law_name]
    x_cols = list(x_cols or law.default_x)
    if len(x_cols) != len(law.terms):
        raise ValueError(f"--x {','.join(x_cols)}: the {law.name} law ({law.formula}) takes {len(law.terms)} "
                         f"column(s), e.g. --x {','.join(law.default_x)}")
    if budget_flops is not None and law.name != "chinchilla":
        raise ValueError(f"--budget needs the chinchilla law (N and D); --law {law.name} has one variable")
    if resamples < 10:
        raise ValueError(f"--bootstrap={resamples}: use at least 10 resamples (200 is the default)")
    x, y, y_col, flops, path = read_points(source, x_cols, y_col, law)
    logx, logy = np.log(x), np.log(y)
    theta = fit_theta(law, logx, logy)
    boot = bootstrap(law, logx, logy, theta, resamples, seed)
    params = to_params(law, theta)
    samples = [to_params(law, t) for t in boot]
    ci95 = {k: [float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5))]
            for k in params}
    residual = predict_log(law, theta, logx) - logy
    result = {"law": law.name, "formula": law.formula, "source": str(path), "x": x_cols, "y": y_col,
              "points": int(len(y)), "params": params, "ci95": ci95, "bootstrap_resamples": resamples,
              "huber_delta": HUBER_DELTA, "rms_log_residual": float(np.sqrt(np.mean(residual**2)))}
    if budget_flops is not None:
        if flops is not None:
            ratio = flops / (x[:, 0] * x[:, 1])
            k, k_from = float(np.median(ratio)), "data"
            logger.info("fit: %.4g training FLOPs per sample per parameter, the median of the CSV's flops column "
                        "(%.4g .. %.4g over the points)", k, ratio.min(), ratio.max())
        else:
            k, k_from = SIX_ND, "6ND"
            logger.info("fit: %s has no flops column; C = 6 N D assumed (a language model's count per token, "
                        "not a ViT sample's)", path)
        optimum = compute_optimal(params, budget_flops, k)
        boot_opt = [compute_optimal(s, budget_flops, k) for s in samples]
        result["compute_optimal"] = {**optimum, "flops_per_sample_param": k, "flops_from": k_from,
                                     "ci95": {key: [float(np.percentile([b[key] for b in boot_opt], 2.5)),
                                                    float(np.percentile([b[key] for b in boot_opt], 97.5))]
                                              for key in ("params", "samples", "loss")}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "fit.json", json.dumps(result, indent=2) + "\n")
    plot(law, x, y, x_cols, y_col, theta, boot, out / "fit.png")
    return result


def report(result: dict) -> str:
    """The fit as text: each parameter with its bootstrap interval, then the compute-optimal point."""
    lines = [f"{result['formula']}  ({result['points']} points from {result['source']}, y = {result['y']}, "
             f"x = {', '.join(result['x'])})"]
    for k, v in result["params"].items():
        lo, hi = result["ci95"][k]
        lines.append(f"  {k:>6} = {v:<12.5g} 95% [{lo:.5g}, {hi:.5g}]")
    lines.append(f"  rms residual of log loss: {result['rms_log_residual']:.4g}")
    if "compute_optimal" in result:
        c = result["compute_optimal"]
        ci = c["ci95"]
        lines.append(f"  compute-optimal at C = {c['budget_flops']:.4g} FLOPs (C = {c['flops_per_sample_param']:.4g} "
                     f"N D, k from {c['flops_from']}): N = {c['params']:.4g} [{ci['params'][0]:.4g}, "
                     f"{ci['params'][1]:.4g}], D = {c['samples']:.4g} [{ci['samples'][0]:.4g}, "
                     f"{ci['samples'][1]:.4g}], loss {c['loss']:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vitscale-fit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a CSV (columns params,samples,loss by default) or a vitscale-sweep folder")
    ap.add_argument("--law", choices=sorted(LAWS), default="chinchilla")
    ap.add_argument("--x", help="x column(s), comma-separated (default: params,samples for chinchilla, samples "
                    "for data, params for power)")
    ap.add_argument("--y", help="the loss column (default loss; train_loss for a sweep.csv)")
    ap.add_argument("--budget", type=float, metavar="FLOPS", help="training budget for the compute-optimal N and D")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    ap.add_argument("--out", default="fit", help="folder for fit.json and fit.png (default ./fit)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    x_cols = [c.strip() for c in args.x.split(",") if c.strip()] if args.x else None
    try:
        result = run_fit(args.source, args.law, args.out, x_cols, args.y, args.budget, args.bootstrap, args.seed)
    except ValueError as e:
        logger.error("vitscale-fit: %s", e)
        return 2
    print(report(result))
    logger.info("fit: wrote %s and %s", Path(args.out) / "fit.json", Path(args.out) / "fit.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
