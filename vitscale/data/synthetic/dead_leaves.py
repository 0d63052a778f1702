"""Dead-leaves images: occluding shapes with power-law sizes, dropped until the image is covered.

The dead-leaves model (Lee, Mumford & Huang, "Occlusion models for natural images", IJCV
2001) drops opaque shapes ("leaves") one over another; with radii distributed as
``r^-alpha`` between ``rmin`` and ``rmax`` (alpha near 3 gives scale invariance) the images
share natural images' occlusion and size statistics. Baradad et al. ("Learning to See by
Looking at Noise", NeurIPS 2021) pre-trained on several dead-leaves variants (squares,
oriented shapes, mixed shapes, textured leaves). A class (category) here is a deterministic parameter set drawn from the class index
and the dataset seed: alpha, leaf shape (disk, square, equilateral triangle), radius range,
a colour palette (hue centre and spread, saturation and value ranges, background colour),
leaf orientation and its spread, and texture (flat, or shaded with a linear gradient across
each leaf). An instance is the leaves' own random draws (position, radius, orientation,
colour, shading), from ``leaf_seed``.

Rendering goes front to back with a coverage mask: the first leaf drawn is the top one, a
pixel takes the colour of the first leaf that covers it, and rendering stops as soon as
every pixel is covered, so no work is spent on leaves that would be hidden (back-to-front
painting has to draw all of them, and needs their number in advance). Leaves are drawn in
chunks of rows from one random stream, so leaf ``i`` is the same however many are needed.
With ``num_shapes=None`` (the default) leaves fall until the image is covered; with an
integer, that many fall and the class background shows where none did.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator

logger = logging.getLogger(__name__)

Shape = Literal["disk", "square", "triangle"]
Texture = Literal["flat", "shaded"]
SHAPES: tuple[str, ...] = ("disk", "square", "triangle")
TEXTURES: tuple[str, ...] = ("flat", "shaded")
_CHUNK = 1024  # leaves drawn per round; a covered image stops the kernel mid-chunk
_COLUMNS = 9  # uniforms per leaf: x, y, radius, angle, hue, saturation, value, shade direction, shade


@njit(cache=True)
def _drop_leaves(img: np.ndarray, covered: np.ndarray, n_covered: int, shape: int, cx: np.ndarray,
                 cy: np.ndarray, r: np.ndarray, cos_a: np.ndarray, sin_a: np.ndarray, rgb: np.ndarray,
                 gx: np.ndarray, gy: np.ndarray) -> tuple[int, int]:
    """Paint leaves front to back into the pixels not yet covered.

    img: (H, W, 3) uint8, written in place; covered: (H, W) uint8 mask, updated in place;
    n_covered: pixels already covered; shape: index into SHAPES; per leaf (N,): centre cx, cy
    and circumradius r in pixels, orientation cos_a, sin_a, colour rgb (N, 3) in [0, 1],
    shading gradient gx, gy (relative brightness change per pixel).
    Returns (pixels covered now, leaves consumed): stops after the leaf that covers the last pixel.
    """
    h, w = covered.shape
    total = h * w
    half_side = 1.0 / math.sqrt(2.0)  # a square of circumradius r has half-side r / sqrt(2)
    sqrt3_2 = math.sqrt(3.0) / 2.0
    for n in range(cx.shape[0]):
        rr = r[n]
        # Pixel centres (j + 0.5, i + 0.5) within the leaf's bounding circle.
        i0, i1 = max(0, int(math.ceil(cy[n] - rr - 0.5))), min(h - 1, int(math.floor(cy[n] + rr - 0.5)))
        j0, j1 = max(0, int(math.ceil(cx[n] - rr - 0.5))), min(w - 1, int(math.floor(cx[n] + rr - 0.5)))
        for i in range(i0, i1 + 1):
            dy = i + 0.5 - cy[n]
            for j in range(j0, j1 + 1):
                if covered[i, j]:
                    continue
                dx = j + 0.5 - cx[n]
                if shape == 0:
                    inside = dx * dx + dy * dy <= rr * rr
                else:
                    u = cos_a[n] * dx + sin_a[n] * dy  # leaf frame
                    v = -sin_a[n] * dx + cos_a[n] * dy
                    if shape == 1:
                        inside = abs(u) <= rr * half_side and abs(v) <= rr * half_side
                    else:
                        # Equilateral triangle, vertex on +u: three half-planes at the inradius r/2.
                        inside = (-u <= 0.5 * rr and 0.5 * u + sqrt3_2 * v <= 0.5 * rr
                                  and 0.5 * u - sqrt3_2 * v <= 0.5 * rr)
                if inside:
                    shade = 1.0 + gx[n] * dx + gy[n] * dy
                    for c in range(3):
                        val = min(max(rgb[n, c] * shade, 0.0), 1.0)
                        img[i, j, c] = np.uint8(int(val * 255.0 + 0.5))
                    covered[i, j] = 1
                    n_covered += 1
        if n_covered == total:
            return n_covered, n + 1
    return n_covered, cx.shape[0]


@njit(cache=True)
def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    """HSV -> RGB for one colour, all in [0, 1] (hue wraps)."""
    h6 = (h % 1.0) * 6.0
    sector = math.floor(h6)
    f = h6 - sector
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    k = int(sector) % 6
    if k == 0:
        return v, t, p
    if k == 1:
        return q, v, p
    if k == 2:
        return p, v, t
    if k == 3:
        return p, q, v
    if k == 4:
        return t, p, v
    return v, p, q


@njit(cache=True)
def _power_law(u: float, alpha: float, rmin: float, rmax: float) -> float:
    """Inverse CDF of the density ``r^-alpha`` on [rmin, rmax] at ``u`` in [0, 1)."""
    if abs(alpha - 1.0) < 1e-9:
        return rmin * (rmax / rmin) ** u
    e = 1.0 - alpha
    lo, hi = rmin**e, rmax**e
    return min(max((lo + u * (hi - lo)) ** (1.0 / e), rmin), rmax)  # clip: round-off at the ends


@njit(cache=True)
def _leaf_arrays(u: np.ndarray, image_size: int, alpha: float, rmin: float, rmax: float, orientation: float,
                 orientation_spread: float, hue: float, hue_spread: float, s_lo: float, s_hi: float, v_lo: float,
                 v_hi: float, shade: float, rotate: bool):
    n = u.shape[0]
    cx, cy, r = np.empty(n), np.empty(n), np.empty(n)
    cos_a, sin_a, gx, gy = np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n)
    rgb = np.empty((n, 3))
    # Centres reach 2 rmin past the border: border pixels are then hit by the many small
    # leaves about as often as interior ones, so covering does not wait on the corners.
    margin = 2.0 * rmin
    span = image_size + 2.0 * margin
    for k in range(n):
        cx[k] = u[k, 0] * span - margin
        cy[k] = u[k, 1] * span - margin
        r[k] = _power_law(u[k, 2], alpha, rmin, rmax)
        if rotate:  # disks need no orientation: skip the trigonometry
            angle = orientation + orientation_spread * (2.0 * u[k, 3] - 1.0)
            cos_a[k], sin_a[k] = math.cos(angle), math.sin(angle)
        rgb[k, 0], rgb[k, 1], rgb[k, 2] = _hsv_to_rgb(hue + hue_spread * (u[k, 4] - 0.5),
                                                      s_lo + (s_hi - s_lo) * u[k, 5], v_lo + (v_hi - v_lo) * u[k, 6])
        if shade > 0.0:
            # Brightness changes linearly across the leaf, by up to +-shade at its rim.
            g, d = shade * u[k, 8] / r[k], 2.0 * math.pi * u[k, 7]
            gx[k], gy[k] = g * math.cos(d), g * math.sin(d)
    return cx, cy, r, cos_a, sin_a, rgb, gx, gy


def draw_leaves(p: dict, u: np.ndarray, image_size: int) -> dict[str, np.ndarray]:
    """Leaves from uniforms ``u`` (N, 9) (one row per leaf) and the image's params ``p``.

    Returns arrays (N,): ``cx``, ``cy``, ``r`` (pixels), ``cos_a``, ``sin_a`` (orientation),
    ``gx``, ``gy`` (shading gradient per pixel) and ``rgb`` (N, 3) in [0, 1].
    """
    arrays = _leaf_arrays(u, image_size, p["alpha"], p["rmin"], p["rmax"], p["orientation"],
                          p["orientation_spread"], p["hue"], p["hue_spread"], *p["saturation"], *p["value"],
                          p["shade"], p["shape"] != "disk")
    return dict(zip(("cx", "cy", "r", "cos_a", "sin_a", "rgb", "gx", "gy"), arrays))


def _check_range(name: str, value: tuple, lo: float) -> tuple[float, float]:
    if len(value) != 2 or not lo <= value[0] <= value[1]:
        raise ValueError(f"dead_leaves {name}={value!r} must be two numbers (low, high) with {lo} <= low <= high")
    return float(value[0]), float(value[1])


@register_generator("dead_leaves")
class DeadLeaves:
    """Dead-leaves images; see the module docstring for what a class and an instance are.

    Args:
        num_classes: number of categories.
        image_size: output side length in pixels.
        seed: dataset seed.
        alpha_range: power-law exponent of the radius density ``r^-alpha`` (3: scale invariant).
        rmin_range: smallest leaf radius as a fraction of the image side.
        rmax_range: largest leaf radius as a fraction of the image side.
        shapes: leaf shapes the classes choose from (``disk``, ``square``, ``triangle``).
        textures: leaf textures the classes choose from (``flat``, ``shaded``).
        num_shapes: ``None`` drops leaves until every pixel is covered; an integer drops that many.
        max_shapes: safety limit while covering (never reached with the default ranges: a
            class needs some 10^3..10^4 leaves at 224 px); past it the background shows.
    """

    def __init__(self, num_classes: int, image_size: int, seed: int,
                 alpha_range: tuple[float, float] = (2.0, 4.0), rmin_range: tuple[float, float] = (0.01, 0.04),
                 rmax_range: tuple[float, float] = (0.15, 0.5), shapes: tuple[Shape, ...] = SHAPES,
                 textures: tuple[Texture, ...] = TEXTURES, num_shapes: int | None = None,
                 max_shapes: int = 1_000_000):
        if num_classes < 1 or image_size < 4:
            raise ValueError(f"dead_leaves needs num_classes >= 1 and image_size >= 4, got {num_classes}, {image_size}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.alpha_range = _check_range("alpha_range", tuple(alpha_range), 0.0)
        self.rmin_range = _check_range("rmin_range", tuple(rmin_range), 1e-4)
        self.rmax_range = _check_range("rmax_range", tuple(rmax_range), 1e-4)
        if self.rmax_range[0] < self.rmin_range[1]:
            raise ValueError(f"dead_leaves rmax_range={rmax_range!r} must start at or above the end of "
                             f"rmin_range={rmin_range!r} so that rmin <= rmax in every class")
        if not shapes or any(s not in SHAPES for s in shapes):
            raise ValueError(f"dead_leaves shapes={shapes!r}: choose a non-empty subset of {SHAPES}")
        if not textures or any(t not in TEXTURES for t in textures):
            raise ValueError(f"dead_leaves textures={textures!r}: choose a non-empty subset of {TEXTURES}")
        if num_shapes is not None and num_shapes < 1:
            raise ValueError(f"dead_leaves num_shapes={num_shapes} must be >= 1, or None to cover the image")
        if max_shapes < 1:
            raise ValueError(f"dead_leaves max_shapes={max_shapes} must be >= 1")
        self.shapes, self.textures = tuple(shapes), tuple(textures)
        self.num_shapes, self.max_shapes = num_shapes, int(max_shapes)
        self.covers = num_shapes is None  # every pixel is covered by a leaf (no background left)

    def class_params(self, label: int) -> dict:
        """The parameters that define class ``label`` (the same for all its instances); radii in pixels."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"dead_leaves label {label} outside [0, {self.num_classes}); "
                             f"num_classes={self.num_classes}")
        rng = instance_rng(self.seed, label, 0, stream=1)
        shape = self.shapes[int(rng.integers(len(self.shapes)))]
        texture = self.textures[int(rng.integers(len(self.textures)))]
        s_lo = rng.uniform(0.0, 0.8)
        v_lo = rng.uniform(0.05, 0.6)
        p = {"alpha": rng.uniform(*self.alpha_range),
             "rmin": rng.uniform(*self.rmin_range) * self.image_size,
             "rmax": rng.uniform(*self.rmax_range) * self.image_size,
             "shape": shape, "texture": texture,
             "shade": rng.uniform(0.2, 0.6) if texture == "shaded" else 0.0,
             # Palette: hues around a class hue (spread 1 = all hues), saturation and value ranges.
             "hue": rng.uniform(0.0, 1.0), "hue_spread": rng.uniform(0.05, 1.0),
             "saturation": [s_lo, rng.uniform(s_lo + 0.1, 1.0)], "value": [v_lo, rng.uniform(v_lo + 0.3, 1.0)],
             # Half-width of the leaf angle distribution; pi/2 makes squares and triangles isotropic.
             "orientation": rng.uniform(0.0, np.pi), "orientation_spread": rng.uniform(0.0, np.pi / 2)}
        p["background"] = list(_hsv_to_rgb(p["hue"] + 0.5, rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)))
        return p

    def params(self, label: int, instance: int) -> dict:
        """Class parameters plus ``leaf_seed`` (the leaves' random stream), ``covers`` and ``num_shapes``."""
        if instance < 0:
            raise ValueError(f"dead_leaves instance {instance} must be >= 0")
        p = self.class_params(label)
        p["leaf_seed"] = int(instance_rng(self.seed, label, instance).integers(2**31))
        p["covers"], p["num_shapes"] = self.covers, self.num_shapes
        return p

    def render_with_stats(self, label: int, instance: int) -> tuple[np.ndarray, dict]:
        """The image and ``{"leaves": leaves dropped, "uncovered_pixels": pixels left at the background}``."""
        p = self.params(label, instance)
        size = self.image_size
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = (np.asarray(p["background"]) * 255.0 + 0.5).astype(np.uint8)
        covered = np.zeros((size, size), dtype=np.uint8)
        limit = self.max_shapes if self.num_shapes is None else self.num_shapes
        rng = np.random.default_rng(p["leaf_seed"])
        shape = SHAPES.index(p["shape"])
        n_covered, used = 0, 0
        while n_covered < size * size and used < limit:
            leaves = draw_leaves(p, rng.random((min(_CHUNK, limit - used), _COLUMNS)), size)
            n_covered, n = _drop_leaves(img, covered, n_covered, shape, leaves["cx"], leaves["cy"], leaves["r"],
                                        leaves["cos_a"], leaves["sin_a"], leaves["rgb"], leaves["gx"], leaves["gy"])
            used += n
        if self.covers and n_covered < size * size:
            logger.warning("dead_leaves class %d instance %d: %d pixels uncovered after max_shapes=%d leaves; "
                           "raise max_shapes or rmin_range", label, instance, size * size - n_covered, limit)
        return img, {"leaves": used, "uncovered_pixels": size * size - n_covered}

    def render(self, label: int, instance: int) -> np.ndarray:
        return self.render_with_stats(label, instance)[0]
