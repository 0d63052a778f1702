"""Plain NumPy/PIL reference for the ``visual_atom`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.visual_atom`` from the same ``params()``:
every orbit r0_k + a1 sin(n1 theta + phi1) + a2 sin(n2 theta + phi2) sampled with NumPy
and drawn as a closed outline by PIL ``ImageDraw.line``, orbit after orbit. PIL draws
integer widths without anti-aliasing, so sub-pixel lines come out bolder than ours.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vitscale.data.synthetic.visual_atom import VisualAtom


def render(label: int, instance: int, image_size: int, seed: int, num_classes: int = 1000) -> np.ndarray:
    gen = VisualAtom(num_classes=num_classes, image_size=image_size, seed=seed)
    p = gen.params(label, instance)
    m = gen.points_per_orbit
    theta = np.arange(m) * (2 * np.pi / m)
    w1, w2 = np.sin(p["n1"] * theta + p["phases"][0]), np.sin(p["n2"] * theta + p["phases"][1])
    img = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(img)
    width = max(1, round(p["width"]))
    for r0, (a1, a2), color in zip(p["base_radii"], p["orbit_amplitudes"], p["colors"]):
        r = r0 + a1 * w1 + a2 * w2
        pts = list(zip(p["center"][0] + r * np.cos(theta), p["center"][1] + r * np.sin(theta)))
        draw.line(pts + pts[:1], fill=tuple(int(c + 0.5) for c in color), width=width)
    return np.asarray(img)
