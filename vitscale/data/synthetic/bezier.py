"""Random Bezier curves: a classic formula-driven baseline of strokes of random smooth
curves, in the spirit of the procedural image models of Baradad et al. (NeurIPS 2021,
"Learning to See by Looking at Noise").

Category (class) = a curve template drawn once per class from the seed: the number of
curves (``curves`` range), each curve's degree (``degree`` range, 2 = quadratic) and its
control points, uniform over the central 80% of the image. Instance = the template's
control points moved by Gaussian jitter (``jitter``, a fraction of the image size), and
each curve's stroke width and colour. Templates are independent uniform layouts, so two
classes' control points lie about 40% of the image apart on average, while the default
jitter moves a point by about 4% of the image: the class, not the instance, decides
where the strokes go, and that is what a classifier can learn. Colours and widths vary
per instance and carry no class information.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.draw import stroke_polylines

__all__ = ["BezierCurves", "bezier_points"]


@njit(cache=True)
def bezier_points(ctrl: np.ndarray, offsets: np.ndarray, num_points: int) -> np.ndarray:
    """Sample Bezier curves at evenly spaced parameters with de Casteljau's algorithm.

    Args:
        ctrl: (K, 2) control points of all curves, concatenated.
        offsets: (C + 1,) int; curve c has control points ``offsets[c]:offsets[c + 1]``.
        num_points: samples per curve, t = 0 .. 1 inclusive.

    Returns:
        (C * num_points, 2) points, curve after curve.
    """
    num = offsets.shape[0] - 1
    out = np.empty((num * num_points, 2))
    work = np.empty((ctrl.shape[0], 2))
    for c in range(num):
        lo, hi = offsets[c], offsets[c + 1]
        for i in range(num_points):
            t = i / (num_points - 1)
            for k in range(lo, hi):
                work[k, 0], work[k, 1] = ctrl[k, 0], ctrl[k, 1]
            for level in range(hi - lo - 1, 0, -1):
                for k in range(lo, lo + level):
                    work[k, 0] = (1.0 - t) * work[k, 0] + t * work[k + 1, 0]
                    work[k, 1] = (1.0 - t) * work[k, 1] + t * work[k + 1, 1]
            out[c * num_points + i, 0], out[c * num_points + i, 1] = work[lo, 0], work[lo, 1]
    return out


def _check_int_range(name: str, value, low: int) -> tuple[int, int]:
    lo, hi = value
    if int(lo) != lo or int(hi) != hi or not low <= lo <= hi:
        raise ValueError(f"bezier {name}={value} must be integers (lo, hi) with {low} <= lo <= hi")
    return int(lo), int(hi)


@register_generator("bezier")
class BezierCurves:
    """Random Bezier curve templates; see the module docstring for what a category is.

    Args:
        num_classes: number of categories.
        image_size: output side in pixels.
        seed: dataset seed.
        curves: (min, max) curves per class.
        degree: (min, max) degree of each curve (2 = quadratic, 3 = cubic, ...).
        jitter: standard deviation of the per-instance control-point jitter, as a
            fraction of the image size.
        line_width: (min, max) stroke width in pixels at 224 px (scaled with image_size).
        points_per_curve: samples per curve (the polyline drawn).
        antialias: anti-aliased lines.
    """

    def __init__(self, num_classes: int, image_size: int, seed: int, curves: tuple[int, int] = (1, 4),
                 degree: tuple[int, int] = (2, 4), jitter: float = 0.04,
                 line_width: tuple[float, float] = (1.5, 4.0), points_per_curve: int = 64,
                 antialias: bool = True):
        if num_classes < 1 or image_size < 8:
            raise ValueError(f"bezier needs num_classes >= 1 and image_size >= 8, got {num_classes}, {image_size}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.curves, self.degree = _check_int_range("curves", curves, 1), _check_int_range("degree", degree, 1)
        if not 0.0 <= jitter <= 0.2:
            raise ValueError(f"bezier jitter={jitter} must be in [0, 0.2]: larger jitter blurs the classes together")
        lw0, lw1 = line_width
        if not 0.0 < lw0 <= lw1:
            raise ValueError(f"bezier line_width={line_width} must be 0 < min <= max")
        if points_per_curve < 2:
            raise ValueError(f"bezier points_per_curve={points_per_curve} must be >= 2")
        self.jitter, self.line_width = float(jitter), (float(lw0), float(lw1))
        self.points_per_curve, self.antialias = int(points_per_curve), bool(antialias)

    def template(self, label: int) -> list[list[list[float]]]:
        """Category ``label``: per curve, its control points as (x, y) fractions of the image."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"bezier label {label} outside [0, {self.num_classes}); use a label below num_classes")
        rng = instance_rng(self.seed, label, 0, stream=1)
        num = int(rng.integers(self.curves[0], self.curves[1] + 1))
        degrees = rng.integers(self.degree[0], self.degree[1] + 1, size=num)
        return [rng.uniform(0.1, 0.9, size=(int(d) + 1, 2)).tolist() for d in degrees]

    def _draws(self, label: int, instance: int) -> dict:
        template = self.template(label)
        rng = instance_rng(self.seed, label, instance)
        s, num = self.image_size, len(template)
        ctrl = np.concatenate([np.asarray(c) for c in template])
        ctrl = (ctrl + rng.normal(0.0, self.jitter, size=ctrl.shape)) * (s - 1)
        return {"template": template, "offsets": np.cumsum([0] + [len(c) for c in template]),
                "control_points": ctrl,  # (K, 2) pixels
                "widths": rng.uniform(*self.line_width, size=num) * (s / 224.0),
                "colors": rng.uniform(0.3, 1.0, size=(num, 3)) * 255.0}

    def params(self, label: int, instance: int) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self._draws(label, instance).items()}

    def render(self, label: int, instance: int) -> np.ndarray:
        p = self._draws(label, instance)
        m, num = self.points_per_curve, len(p["widths"])
        pts = bezier_points(p["control_points"], p["offsets"], m)
        img = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        stroke_polylines(img, pts[:, 0], pts[:, 1], np.arange(num + 1) * m, p["widths"], p["colors"],
                         antialias=self.antialias)
        return img
