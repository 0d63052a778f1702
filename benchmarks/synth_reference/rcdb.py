"""Plain NumPy/PIL reference for the ``rcdb`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.rcdb`` from the same ``params()``: the
vertex radii of every ring perturbed by periodic 1-D Perlin noise (NumPy), each ring
drawn as a closed polygon outline by PIL ``ImageDraw.line``. PIL draws integer widths
without anti-aliasing, so edges and thin rings differ from ours.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vitscale.data.synthetic.rcdb import RCDB


def perlin_1d(x: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Periodic 1-D Perlin noise in [-1, 1]; period len(gradients) cells."""
    cell = np.floor(x)
    t = x - cell
    i0 = cell.astype(np.int64) % len(gradients)
    i1 = (i0 + 1) % len(gradients)
    fade = t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
    return 2.0 * ((1.0 - fade) * gradients[i0] * t + fade * gradients[i1] * (t - 1.0))


def render(label: int, instance: int, image_size: int, seed: int, num_classes: int = 1000) -> np.ndarray:
    p = RCDB(num_classes=num_classes, image_size=image_size, seed=seed).params(label, instance)
    n, cells = p["num_vertices"], p["noise_cells"]
    gradients = np.asarray(p["gradients"])
    theta = p["rotation"] + 2 * np.pi * np.arange(n) / n
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    for ring, radius in enumerate(p["radii"]):
        pos = p["noise_phase"] + np.arange(n) * (cells / n) + ring * p["noise_drift"]
        r = radius * (1.0 + p["noise_amplitude"] * perlin_1d(pos, gradients))
        pts = list(zip(p["center"][0] + r * np.cos(theta), p["center"][1] + r * np.sin(theta)))
        draw.line(pts + pts[:1], fill=tuple(int(c + 0.5) for c in p["colors"][ring]),
                  width=max(1, round(p["widths"][ring])), joint="curve")
    return np.asarray(img)
