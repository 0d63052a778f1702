"""Plain NumPy reference for the ``exfractal`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.exfractal`` (default orthographic point mode)
from the same ``params()``: the 3-D chaos game as a Python loop over points (map choices drawn up
front by ``Generator.choice``, so the orbit differs from ours), rotation and framing with NumPy,
and the z-buffer as a painter's algorithm: points sorted far to near and drawn by fancy indexing.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from vitscale.data.synthetic.exfractal import SHADE_MIN, ExFractal, view_rotation
from vitscale.data.synthetic.fractal import BURN_IN


@lru_cache(maxsize=4)
def _generator(image_size: int, seed: int) -> ExFractal:
    # Categories are searched lazily per label, so a large num_classes costs nothing.
    return ExFractal(num_classes=1_000_000, image_size=image_size, seed=seed)


def render(label: int, instance: int, image_size: int, seed: int) -> np.ndarray:
    gen = _generator(image_size, seed)
    p = gen.params(label, instance)
    maps, palette = np.array(p["maps"]), np.array(p["palette"])
    probs = np.array(p["probs"]) / np.sum(p["probs"])
    choices = np.random.default_rng(p["chaos_seed"]).choice(len(maps), size=gen.num_points, p=probs)
    linear, shift = maps[:, :9].reshape(-1, 3, 3), maps[:, 9:]
    xyz = np.empty((gen.num_points, 3))
    rgb = np.empty((gen.num_points, 3))
    point = np.zeros(3)
    colour = palette[0]
    for i, j in enumerate(choices.tolist()):
        point = linear[j] @ point + shift[j]
        colour = 0.5 * (colour + palette[j])
        xyz[i] = point
        rgb[i] = colour
    uvw = xyz[BURN_IN:] @ view_rotation(p["azimuth_deg"], p["elevation_deg"]).T
    rgb = rgb[BURN_IN:]
    lo, hi = uvw.min(axis=0), uvw.max(axis=0)
    scale = (image_size - 2 * gen.margin_px) / max(hi[0] - lo[0], hi[1] - lo[1])
    mid = 0.5 * (lo + hi)
    cols = np.clip((0.5 * image_size + (uvw[:, 0] - mid[0]) * scale).astype(int), 0, image_size - 1)
    rows = np.clip((0.5 * image_size - (uvw[:, 1] - mid[1]) * scale).astype(int), 0, image_size - 1)
    depth = (uvw[:, 2] - lo[2]) / max(hi[2] - lo[2], 1e-300)
    order = np.argsort(depth, kind="stable")  # far first: nearer points overwrite
    shade = SHADE_MIN + (1.0 - SHADE_MIN) * depth[order, None]
    img = np.zeros((image_size, image_size, 3), np.uint8)
    img[rows[order], cols[order]] = (np.round(rgb[order] * 255.0) * shade + 0.5).astype(np.uint8)
    return img
