"""Plain NumPy reference for the ``perlin`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.perlin``: gradient noise evaluated for the
whole pixel grid at once with array operations, one octave after another, min-max
normalised, then a colour lookup. Parameters and tables come from the generator
(``params()`` and its table helpers), so the images match ours up to float round-off.
"""
from __future__ import annotations

import numpy as np

from vitscale.data.synthetic.perlin import Perlin, colour_lut, noise_tables, octave_arrays


def _noise(x: np.ndarray, y: np.ndarray, perm: np.ndarray, grad: np.ndarray) -> np.ndarray:
    x0, y0 = np.floor(x), np.floor(y)
    xi, yi = x0.astype(np.int64) & 255, y0.astype(np.int64) & 255
    fx, fy = x - x0, y - y0

    def corner(dx: int, dy: int) -> np.ndarray:
        g = grad[perm[perm[xi + dx] + yi + dy]]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    u = fx * fx * fx * (fx * (fx * 6.0 - 15.0) + 10.0)
    v = fy * fy * fy * (fy * (fy * 6.0 - 15.0) + 10.0)
    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    nx0 = n00 + u * (n10 - n00)
    nx1 = n01 + u * (n11 - n01)
    return nx0 + v * (nx1 - nx0)


def render(label: int, instance: int, image_size: int, seed: int) -> np.ndarray:
    gen = Perlin(num_classes=label + 1, image_size=image_size, seed=seed)
    p = gen.params(label, instance)
    perm, grad = noise_tables(p["noise_seed"])
    freqs, amps, frame = octave_arrays(p)
    offsets = np.asarray(p["offsets"])
    coords = (np.arange(image_size) + 0.5) / image_size - 0.5
    y, x = np.meshgrid(coords, coords, indexing="ij")
    u, v = frame[0, 0] * x + frame[0, 1] * y, frame[1, 0] * x + frame[1, 1] * y
    field = np.zeros((image_size, image_size))
    for o in range(len(freqs)):
        n = _noise(u * freqs[o] + offsets[o, 0], v * freqs[o] + offsets[o, 1], perm, grad)
        if p["mode"] == "turbulence":
            n = np.abs(n)
        elif p["mode"] == "ridged":
            n = (1.0 - np.abs(n)) ** 2
        field += amps[o] * n
    lo, hi = field.min(), field.max()
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return colour_lut(p["colour_stops"])[((field - lo) * scale + 0.5).astype(np.int64)]
