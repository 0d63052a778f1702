"""ExFractalDB: views of 3-D fractals (Kataoka et al., CVPR 2022, "Replacing Labeled Real-image
Datasets with Auto-generated Contours"; the 3-D IFS as in Yamada et al.'s MV-FractalDB and
PC-FractalDB).

Category: a random 3-D iterated function system of N affine maps ``p -> A p + t`` (A 3x3, t a
3-vector, all 12 numbers uniform in [-1, 1], N in ``[min_maps, max_maps]``), map i chosen with
probability ``|det A_i| / sum_j |det A_j|``. The acceptance test is FractalDB's filling ratio
carried to 3-D: the point cloud (``search_points`` points) is scaled into a cube (one scale for
all axes), projected onto the xy, yz and xz planes at ``search_size`` px, and the system is
accepted when the *smallest* of the three filling ratios reaches ``fill_threshold``. Taking the
smallest plays the part of the spread (variance) test used for 3-D fractal categories: flat or
needle-like systems fill little of at least one plane and are rejected. The default threshold is
0.1, not 2-D FractalDB's 0.2: with one scale for all axes and the worst of three planes, none of
2000 random 3-D systems reached 0.2, and 2.6% reach 0.1 (about 40 candidates per category).
Candidates of category k come from ``instance_rng(seed, k, 0, stream=1)``, so a category is a
pure function of (seed, k).

Instance: a view of the category's fractal. Instance i looks from azimuth
``360 deg * (i mod num_views) / num_views`` (``num_views`` fixed views around the object) plus a
jitter of up to ``view_jitter_deg``, at an elevation uniform in ``[-elevation_deg, elevation_deg]``;
as in FractalDB, one parameter of one map is multiplied by a weight from ``weights``, and each
instance draws its map colours, patch pattern and chaos-game seed (all from
``instance_rng(seed, label, i)``).

Rendering, without OpenGL: the chaos-game cloud (first ``BURN_IN`` points skipped) is rotated to
the view (azimuth about the vertical axis, then elevation) and projected orthographically or, with
``projection="perspective"``, through a pinhole ``CAMERA_DISTANCE`` object sizes away; the
projection is framed like FractalDB's 2-D clouds (its bounding box, one scale for both axes, fills
the image less the margin). A z-buffer keeps the nearest point per pixel and depth shades it,
from ``SHADE_MIN`` (farthest point) to full brightness (nearest), on black; points or patches and
colours as in ``fractal``.
"""
from __future__ import annotations

import math
import threading
from typing import Literal

import numpy as np
import torch
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.device import render_ifs
from vitscale.data.synthetic.fractal import (BURN_IN, MAX_COORD, Fractal, cdf_of, check_instance_args,
                                             draw_palette, draw_patch, filling_ratio, ifs_probabilities, map_table,
                                             perturb_one, pick_map_fast, search_ifs, splat, splitmix64)

__all__ = ["ExFractal", "evaluate_system_3d", "search_category_3d", "view_rotation"]

SHADE_MIN = 0.25  # brightness of the farthest point: dark enough to read depth, bright enough to see
CAMERA_DISTANCE = 2.0  # perspective camera distance from the cloud's centre, in object sizes


@njit(cache=True)
def chaos_game_3d(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int):
    """Orbit of the 3-D IFS ``maps`` (N, 12: A row-major, then t) from the origin, with colours
    as in ``fractal.chaos_game_2d``. Returns ``(xyz (num_points, 3), rgb (num_points, 3) uint8,
    n_valid)``."""
    xyz = np.empty((num_points, 3))
    rgb = np.empty((num_points, 3), np.uint8)
    return xyz, rgb, _chaos_game_3d_into(maps, cdf, palette, num_points, seed, xyz, rgb)


@njit(cache=True)
def _chaos_game_3d_into(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int,
                        xyz: np.ndarray, rgb: np.ndarray) -> int:
    """``chaos_game_3d`` into ``xyz`` and ``rgb`` (at least num_points rows each); returns n_valid."""
    state = np.uint64(seed)
    x, y, z = 0.0, 0.0, 0.0
    c0, c1, c2 = palette[0, 0], palette[0, 1], palette[0, 2]
    table = map_table(cdf)
    for i in range(num_points):
        state, r = splitmix64(state)
        j = pick_map_fast(table, cdf, r)
        x, y, z = (maps[j, 0] * x + maps[j, 1] * y + maps[j, 2] * z + maps[j, 9],
                   maps[j, 3] * x + maps[j, 4] * y + maps[j, 5] * z + maps[j, 10],
                   maps[j, 6] * x + maps[j, 7] * y + maps[j, 8] * z + maps[j, 11])
        if not (abs(x) <= MAX_COORD and abs(y) <= MAX_COORD and abs(z) <= MAX_COORD):
            return i
        c0, c1, c2 = 0.5 * (c0 + palette[j, 0]), 0.5 * (c1 + palette[j, 1]), 0.5 * (c2 + palette[j, 2])
        xyz[i, 0], xyz[i, 1], xyz[i, 2] = x, y, z
        rgb[i, 0] = np.uint8(c0 * 255.0 + 0.5)
        rgb[i, 1] = np.uint8(c1 * 255.0 + 0.5)
        rgb[i, 2] = np.uint8(c2 * 255.0 + 0.5)
    return num_points


@njit(cache=True)
def _fill_3d(maps: np.ndarray, cdf: np.ndarray, num_points: int, seed: int, size: int) -> float:
    """Smallest filling ratio of the xy, yz and xz projections of the cloud scaled into a cube."""
    xyz, _, n = chaos_game_3d(maps, cdf, np.ones((maps.shape[0], 3)), num_points, seed)
    if n < num_points or n <= BURN_IN:  # diverging systems are never categories
        return 0.0
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for i in range(BURN_IN, n):
        for a in range(3):
            lo[a] = min(lo[a], xyz[i, a])
            hi[a] = max(hi[a], xyz[i, a])
    half = 0.5 * max(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])
    if half == 0.0:
        return 0.0
    scale = 0.5 * size / half
    rows = np.empty(n - BURN_IN, np.int32)
    cols = np.empty(n - BURN_IN, np.int32)
    worst = 1.0
    for a, b in ((0, 1), (1, 2), (0, 2)):
        for i in range(BURN_IN, n):
            cols[i - BURN_IN] = min(int(0.5 * size + (xyz[i, a] - 0.5 * (lo[a] + hi[a])) * scale), size - 1)
            rows[i - BURN_IN] = min(int(0.5 * size + (xyz[i, b] - 0.5 * (lo[b] + hi[b])) * scale), size - 1)
        worst = min(worst, filling_ratio(rows, cols, size))
    return worst


@njit(cache=True)
def _project(xyz: np.ndarray, start: int, stop: int, rot: np.ndarray, size: int, margin_px: int,
             perspective: bool, rows: np.ndarray, cols: np.ndarray, depth: np.ndarray):
    """Pixels and depth in [0, 1] (1 = nearest) of points ``[start, stop)`` seen through rotation
    ``rot`` (3, 3) to camera coordinates (u right, v up, w towards the camera). The projection is
    scaled, keeping its aspect ratio, to fill the image less the margin, as FractalDB frames its
    2-D clouds.

    Camera coordinates are recomputed in each pass rather than stored: another large array costs
    more in page faults than the arithmetic. The loops are written out with scalar bounds (no
    helper returning tuples, no array elements as accumulators), which runs 3x faster. The
    results go into ``rows``, ``cols`` and ``depth`` (at least stop - start each; kept by the
    caller from image to image), and the filled parts are returned.
    """
    r00, r01, r02 = rot[0, 0], rot[0, 1], rot[0, 2]
    r10, r11, r12 = rot[1, 0], rot[1, 1], rot[1, 2]
    r20, r21, r22 = rot[2, 0], rot[2, 1], rot[2, 2]
    u0, u1, v0, v1, w0, w1 = np.inf, -np.inf, np.inf, -np.inf, np.inf, -np.inf
    for i in range(start, stop):
        x, y, z = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        u, v, w = r00 * x + r01 * y + r02 * z, r10 * x + r11 * y + r12 * z, r20 * x + r21 * y + r22 * z
        u0, u1, v0, v1, w0, w1 = min(u0, u), max(u1, u), min(v0, v), max(v1, v), min(w0, w), max(w1, w)
    # Perspective: a pinhole CAMERA_DISTANCE object sizes in front of the cloud's centre (cu, cv,
    # cw) shrinks a point by f = cam / (cam - (w - cw)) towards the centre; f = 1 is orthographic.
    cu, cv, cw = 0.5 * (u0 + u1), 0.5 * (v0 + v1), 0.5 * (w0 + w1)
    cam = CAMERA_DISTANCE * max(u1 - u0, v1 - v0, w1 - w0, 1e-300) if perspective else np.inf
    if perspective:
        u0, u1, v0, v1 = np.inf, -np.inf, np.inf, -np.inf
        for i in range(start, stop):
            x, y, z = xyz[i, 0], xyz[i, 1], xyz[i, 2]
            f = cam / (cam - (r20 * x + r21 * y + r22 * z - cw))
            u, v = cu + (r00 * x + r01 * y + r02 * z - cu) * f, cv + (r10 * x + r11 * y + r12 * z - cv) * f
            u0, u1, v0, v1 = min(u0, u), max(u1, u), min(v0, v), max(v1, v)
    span = max(u1 - u0, v1 - v0)
    scale = (size - 2 * margin_px) / span if span > 0 else 0.0
    depth_scale = 1.0 / (w1 - w0) if w1 > w0 else 0.0
    mu, mv = 0.5 * (u0 + u1), 0.5 * (v0 + v1)
    for i in range(start, stop):
        x, y, z = xyz[i, 0], xyz[i, 1], xyz[i, 2]
        u, v, w = r00 * x + r01 * y + r02 * z, r10 * x + r11 * y + r12 * z, r20 * x + r21 * y + r22 * z
        if perspective:
            f = cam / (cam - (w - cw))
            u, v = cu + (u - cu) * f, cv + (v - cv) * f
        k = i - start
        cols[k] = min(max(int(0.5 * size + (u - mu) * scale), 0), size - 1)
        rows[k] = min(max(int(0.5 * size - (v - mv) * scale), 0), size - 1)
        depth[k] = (w - w0) * depth_scale if depth_scale > 0 else 1.0
    return rows[:stop - start], cols[:stop - start], depth[:stop - start]


@njit(cache=True)
def _render_3d(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int,
               rot: np.ndarray, size: int, margin_px: int, perspective: bool, mask: np.ndarray, xyz: np.ndarray,
               rgb: np.ndarray, rows: np.ndarray, cols: np.ndarray, depth: np.ndarray) -> np.ndarray:
    n = _chaos_game_3d_into(maps, cdf, palette, num_points, seed, xyz, rgb)
    start = min(BURN_IN, n)
    rows, cols, depth = _project(xyz, start, n, rot, size, margin_px, perspective, rows, cols, depth)
    return splat(size, rows, cols, rgb[start:n], depth, mask, False, False, SHADE_MIN)


# The orbit's and the projection's buffers, one set per thread, reused from image to image (as
# fractal's): for 100k points they are 4.3 MB, about 1000 page faults when allocated per image.
_scratch = threading.local()


def _orbit_buffers_3d(num_points: int) -> tuple[np.ndarray, ...]:
    """This thread's (xyz, rgb, rows, cols, depth) buffers for ``_render_3d``, grown to ``num_points``."""
    bufs = getattr(_scratch, "orbit", None)
    if bufs is None or bufs[0].shape[0] < num_points:
        bufs = (np.empty((num_points, 3)), np.empty((num_points, 3), np.uint8), np.empty(num_points, np.int32),
                np.empty(num_points, np.int32), np.empty(num_points))
        _scratch.orbit = bufs
    return bufs


def view_rotation(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """(3, 3) rotation to camera coordinates (x right, y up, z towards the camera): turn the
    object by the azimuth about its y axis, then tilt it by the elevation about x."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    ca, sa, ce, se = math.cos(a), math.sin(a), math.cos(e), math.sin(e)
    # Rx(e) @ Ry(a) written out, so that no BLAS call can change the rounding between machines.
    return np.array([[ca, 0.0, sa],
                     [se * sa, ce, -se * ca],
                     [-ce * sa, se, ce * ca]])


def evaluate_system_3d(maps: np.ndarray, probs: np.ndarray | None = None, *, fill_threshold: float = 0.1,
                       search_size: int = 128, search_points: int = 6000, chaos_seed: int = 0) -> tuple[float, bool]:
    """The acceptance test of one 3-D IFS (module docstring).

    Args:
        maps: (N, 12) affine maps (A row-major, t).
        probs: map probabilities; ``|det A|``-proportional when None.
        fill_threshold: smallest accepted filling ratio of the worst axis projection.
        search_size, search_points, chaos_seed: the rendering the ratio is measured on.

    Returns:
        ``(smallest projected filling ratio, accepted)``; a diverging or degenerate system has 0.
    """
    maps = np.ascontiguousarray(maps, np.float64)
    probs = ifs_probabilities(maps) if probs is None else np.asarray(probs, np.float64)
    if not math.fsum(probs.tolist()) > 0:
        return 0.0, False
    fill = float(_fill_3d(maps, cdf_of(probs), search_points, chaos_seed, search_size))
    return fill, fill >= fill_threshold


def search_category_3d(seed: int, label: int, *, min_maps: int = 2, max_maps: int = 8, fill_threshold: float = 0.1,
                       search_size: int = 128, search_points: int = 6000, max_tries: int = 100_000) -> dict:
    """Category ``label``'s 3-D IFS (``fractal.search_ifs`` with ``evaluate_system_3d``)."""
    return search_ifs(evaluate_system_3d, 12, seed, label, min_maps=min_maps, max_maps=max_maps,
                      fill_threshold=fill_threshold, search_size=search_size, search_points=search_points,
                      max_tries=max_tries)


@register_generator("exfractal")
class ExFractal(Fractal):
    """ExFractalDB images; see the module docstring for what a category and an instance are.

    Args:
        num_classes, image_size, seed: the generator contract.
        num_points: chaos-game points per image.
        num_views: fixed azimuths around the object; instance i uses view ``i % num_views``.
        view_jitter_deg: largest random azimuth offset from the instance's fixed view.
        elevation_deg: largest absolute elevation.
        projection: "orthographic" or "perspective".
        mode, patch_size, color, margin, weights: as in ``fractal``.
        min_maps, max_maps, fill_threshold, search_size, search_points, max_tries: the search.
        categories: a saved category set (``categories()``) to use instead of searching.
    """

    name = "exfractal"
    map_params = 12  # a 3x3 matrix and a 3-vector
    search = staticmethod(search_category_3d)

    def __init__(self, num_classes: int, image_size: int, seed: int, num_points: int = 100_000,
                 num_views: int = 12, view_jitter_deg: float = 10.0, elevation_deg: float = 30.0,
                 projection: Literal["orthographic", "perspective"] = "orthographic",
                 mode: Literal["point", "patch"] = "point", patch_size: int = 3, color: bool = True,
                 margin: float = 0.05, weights: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2),
                 min_maps: int = 2, max_maps: int = 8, fill_threshold: float = 0.1, search_size: int = 128,
                 search_points: int = 6000, max_tries: int = 100_000, categories: list[dict] | None = None):
        if num_views < 1:
            raise ValueError(f"exfractal: num_views={num_views} must be >= 1")
        if projection not in ("orthographic", "perspective"):
            raise ValueError(f"exfractal: projection={projection!r} must be 'orthographic' or 'perspective'")
        super().__init__(num_classes, image_size, seed, num_points, mode, patch_size, color, margin, weights,
                         min_maps, max_maps, fill_threshold, search_size, search_points, max_tries, categories)
        self.num_views, self.view_jitter_deg, self.elevation_deg = num_views, view_jitter_deg, elevation_deg
        self.projection = projection

    def params(self, label: int, instance: int) -> dict:
        check_instance_args(self.name, label, self.num_classes, instance)
        cat = self.category(label)
        rng = instance_rng(self.seed, label, instance)
        chaos_seed = int(rng.integers(2**63))
        maps, perturb = perturb_one(np.array(cat["maps"]), rng, self.weights)
        view = instance % self.num_views
        azimuth = 360.0 * view / self.num_views + float(rng.uniform(-self.view_jitter_deg, self.view_jitter_deg))
        elevation = float(rng.uniform(-self.elevation_deg, self.elevation_deg))
        palette = draw_palette(rng, maps.shape[0])
        patch = draw_patch(rng, self.patch_size) if self.mode == "patch" else np.ones((1, 1), bool)
        return {"maps": maps.tolist(), "probs": list(cat["probs"]), "perturb": perturb, "view": view,
                "azimuth_deg": azimuth, "elevation_deg": elevation, "palette": palette.tolist(),
                "patch": patch.astype(int).tolist(), "chaos_seed": chaos_seed}

    def draw(self, p: dict) -> np.ndarray:
        """Render from a ``params()`` dict (also one read back from a shard's JSON)."""
        palette = np.array(p["palette"]) if self.color else np.ones((len(p["maps"]), 3))
        return _render_3d(np.array(p["maps"], np.float64), cdf_of(p["probs"]), palette, self.num_points,
                          p["chaos_seed"], view_rotation(p["azimuth_deg"], p["elevation_deg"]), self.image_size,
                          self.margin_px, self.projection == "perspective", np.array(p["patch"], np.bool_),
                          *_orbit_buffers_3d(self.num_points))

    def render(self, label: int, instance: int) -> np.ndarray:
        return self.draw(self.params(label, instance))

    def render_batch(self, labels: torch.Tensor, instances: torch.Tensor, device: torch.device) -> torch.Tensor:
        """As ``Fractal.render_batch``, through the instances' views and the z-buffer."""
        ps = [self.params(int(k), int(i)) for k, i in zip(labels.tolist(), instances.tolist())]
        rot = np.stack([view_rotation(p["azimuth_deg"], p["elevation_deg"]) for p in ps])
        return render_ifs(ps, [cdf_of(p["probs"]) for p in ps], self.num_points, BURN_IN, self.image_size, self.margin_px, self.color, device,
                          rotations=rot, camera_distance=CAMERA_DISTANCE if self.projection == "perspective" else None,
                          shade_min=SHADE_MIN)
