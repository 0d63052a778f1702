"""Plain NumPy reference for the ``fractal`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.fractal`` (default point mode) from the same
``params()``: the chaos game as a Python loop over points, with map choices drawn up front by
``Generator.choice`` (so the orbit differs from ours, which uses its own in-kernel PRNG), the
cloud scaled per axis with NumPy, drawn by fancy indexing (later points on top) and flipped with
``np.flip``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from vitscale.data.synthetic.fractal import BURN_IN, Fractal


@lru_cache(maxsize=4)
def _generator(image_size: int, seed: int) -> Fractal:
    # Categories are searched lazily per label, so a large num_classes costs nothing.
    return Fractal(num_classes=1_000_000, image_size=image_size, seed=seed)


def render(label: int, instance: int, image_size: int, seed: int) -> np.ndarray:
    gen = _generator(image_size, seed)
    p = gen.params(label, instance)
    maps, palette = np.array(p["maps"]), np.array(p["palette"])
    probs = np.array(p["probs"]) / np.sum(p["probs"])
    choices = np.random.default_rng(p["chaos_seed"]).choice(len(maps), size=gen.num_points, p=probs)
    xy = np.empty((gen.num_points, 2))
    rgb = np.empty((gen.num_points, 3))
    x = y = 0.0
    colour = palette[0]
    for i, j in enumerate(choices.tolist()):
        a, b, c, d, e, f = maps[j]
        x, y = a * x + b * y + e, c * x + d * y + f
        colour = 0.5 * (colour + palette[j])
        xy[i] = x, y
        rgb[i] = colour
    xy, rgb = xy[BURN_IN:], rgb[BURN_IN:]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = image_size - 2 * gen.margin_px
    pix = gen.margin_px + (xy - lo) / np.where(hi > lo, hi - lo, 1.0) * span
    cols = np.minimum(pix[:, 0].astype(int), image_size - 1)
    rows = np.minimum((gen.margin_px + (hi[1] - xy[:, 1]) / max(hi[1] - lo[1], 1e-300) * span).astype(int),
                      image_size - 1)
    img = np.zeros((image_size, image_size, 3), np.uint8)
    img[rows, cols] = (rgb * 255.0 + 0.5).astype(np.uint8)
    if p["flip_h"]:
        img = img[:, ::-1]
    if p["flip_v"]:
        img = img[::-1]
    return np.ascontiguousarray(img)
