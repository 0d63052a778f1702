"""Plain NumPy/PIL reference for the ``bezier`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.bezier`` from the same ``params()``: each
curve evaluated in Bernstein form with NumPy at the same parameters t and drawn by PIL
``ImageDraw.line`` (integer widths, no anti-aliasing, so edges differ from ours).
"""
from __future__ import annotations

from math import comb

import numpy as np
from PIL import Image, ImageDraw

from vitscale.data.synthetic.bezier import BezierCurves


def render(label: int, instance: int, image_size: int, seed: int, num_classes: int = 1000) -> np.ndarray:
    gen = BezierCurves(num_classes=num_classes, image_size=image_size, seed=seed)
    p = gen.params(label, instance)
    t = np.linspace(0.0, 1.0, gen.points_per_curve)[:, None]
    ctrl, offsets = np.asarray(p["control_points"]), p["offsets"]
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    for c in range(len(p["widths"])):
        points = ctrl[offsets[c]:offsets[c + 1]]
        d = len(points) - 1
        basis = np.hstack([comb(d, k) * t**k * (1 - t) ** (d - k) for k in range(d + 1)])  # (m, d + 1)
        curve = basis @ points
        draw.line([tuple(q) for q in curve], fill=tuple(int(v + 0.5) for v in p["colors"][c]),
                  width=max(1, round(p["widths"][c])), joint="curve")
    return np.asarray(img)
