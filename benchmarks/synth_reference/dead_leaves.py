"""Plain PIL/NumPy reference for the ``dead_leaves`` generator (benchmarks only; not imported by the package).

The same algorithm as ``vitscale.data.synthetic.dead_leaves``: leaves front to back with a
coverage mask, stopping once every pixel is covered. Each leaf is rasterised by PIL
``ImageDraw`` (ellipse or polygon) into a mask over its bounding box, and NumPy paints the
pixels of that mask not yet covered. Leaves and class parameters come from the generator
(``params()`` and ``draw_leaves``), in the same chunks of the same random stream; PIL's
rasterisation rule differs from ours at shape edges, so single edge pixels may differ.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vitscale.data.synthetic.dead_leaves import _CHUNK, _COLUMNS, DeadLeaves, draw_leaves


def _outline(shape: str, cx: float, cy: float, r: float, c: float, s: float) -> list[tuple[float, float]]:
    """Polygon vertices of a square or triangle of circumradius r, leaf frame (c, s) = (cos, sin)."""
    corners = ([(1, 1), (-1, 1), (-1, -1), (1, -1)] if shape == "square"
               else [(1.0, 0.0), (-0.5, 3**0.5 / 2), (-0.5, -(3**0.5) / 2)])
    k = r / 2**0.5 if shape == "square" else r
    # Leaf frame -> image: (u, v) -> (c u - s v, s u + c v).
    return [(cx + k * (c * u - s * v), cy + k * (s * u + c * v)) for u, v in corners]


def render(label: int, instance: int, image_size: int, seed: int) -> np.ndarray:
    gen = DeadLeaves(num_classes=label + 1, image_size=image_size, seed=seed)
    p = gen.params(label, instance)
    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
    img[:] = (np.asarray(p["background"]) * 255.0 + 0.5).astype(np.uint8)
    covered = np.zeros((image_size, image_size), dtype=bool)
    rng = np.random.default_rng(p["leaf_seed"])
    used = 0
    while not covered.all() and used < gen.max_shapes:
        leaves = draw_leaves(p, rng.random((min(_CHUNK, gen.max_shapes - used), _COLUMNS)), image_size)
        for n in range(len(leaves["r"])):
            cx, cy, r = leaves["cx"][n], leaves["cy"][n], leaves["r"][n]
            x0, y0 = max(0, int(np.floor(cx - r))), max(0, int(np.floor(cy - r)))
            x1, y1 = min(image_size, int(np.ceil(cx + r)) + 1), min(image_size, int(np.ceil(cy + r)) + 1)
            used += 1
            if x1 <= x0 or y1 <= y0:
                continue
            # PIL puts integer coordinates on pixel centres; ours are at +0.5, hence the shift.
            mask_img = Image.new("L", (x1 - x0, y1 - y0), 0)
            draw = ImageDraw.Draw(mask_img)
            lx, ly = cx - x0 - 0.5, cy - y0 - 0.5
            if p["shape"] == "disk":
                draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=1)
            else:
                draw.polygon(_outline(p["shape"], lx, ly, r, leaves["cos_a"][n], leaves["sin_a"][n]), fill=1)
            new = (np.asarray(mask_img) > 0) & ~covered[y0:y1, x0:x1]
            if not new.any():
                continue
            yy, xx = np.nonzero(new)
            dx, dy = xx + x0 + 0.5 - cx, yy + y0 + 0.5 - cy
            shade = 1.0 + leaves["gx"][n] * dx + leaves["gy"][n] * dy
            colour = np.clip(leaves["rgb"][n][None, :] * shade[:, None], 0.0, 1.0)
            img[yy + y0, xx + x0] = (colour * 255.0 + 0.5).astype(np.uint8)
            covered[y0:y1, x0:x1] |= new
            if covered.all():
                break
    return img
