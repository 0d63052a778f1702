"""FractalDB: 2-D fractals of random iterated function systems (Kataoka et al., ACCV 2020,
"Pre-training without Natural Images").

Category: a random 2-D iterated function system (IFS) of N affine maps
``(x, y) -> (a x + b y + e, c x + d y + f)``, N drawn from ``[min_maps, max_maps]`` (2..8 as
published), the six parameters of each map uniform in [-1, 1], and map i chosen with probability
``|det_i| / sum_j |det_j|`` (``det = a d - b c``). As in the paper, a candidate system becomes a
category only if its *filling ratio* -- the fraction of pixels hit by its point cloud, scaled per
axis to the whole image -- reaches ``fill_threshold`` (0.2 as published). The ratio is measured on
a small rendering, ``search_points`` = 6000 points at ``search_size`` = 128 px: about 0.37 points
per pixel, as sparse as 100k points at 512 px; on denser search renderings 0.2 also admits diffuse
clouds with a few far-flung points. Candidates of category k are drawn from
``instance_rng(seed, k, 0, stream=1)``, so every category is a pure function of (seed, k) and a
search can be split over processes. Found categories can be saved and reused (``categories()``, the ``categories=`` argument;
``vitscale.data.shards.save_categories`` / ``load_categories`` and ``vitscale-synth search`` for files).

Instance: the paper's intra-category variation, made deterministic. From
``instance_rng(seed, label, instance)`` an instance draws one parameter of one map and multiplies
it by a weight from ``weights`` (0.8 to 1.2 by 0.1, after the paper's weighting of one parameter),
a horizontal and a vertical flip (each with probability 1/2), a colour per map, a binary patch
pattern (centre always set) for patch mode and the seed of its chaos game. The category's map
probabilities are kept, so the perturbed system is a small deformation of the category's
attractor.

Rendering: the chaos game (``num_points`` points, the first ``BURN_IN`` skipped while the orbit
settles onto the attractor), the point cloud scaled per axis into the image less a margin as in
the published renderer, drawn on black as single pixels ("point") or as ``patch_size`` x
``patch_size`` patches ("patch", the paper's patch rendering). With ``color=True`` a point's
colour is the running average of the colours of the maps that produced it (so colour follows the
IFS structure); with ``color=False`` points are white. An orbit that leaves ``|x| <= MAX_COORD``
(or turns non-finite) stops there and only the points before it are drawn; the search rejects
such systems, and about 1 in 3000 perturbed instances of accepted ones diverges.

The kernels here (chaos game, splatting, filling ratio) and the category file helpers are shared
with ``exfractal`` (3-D fractals).
"""
from __future__ import annotations

import colorsys
import math
import threading
from typing import Callable, Literal

import numpy as np
import torch
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.device import render_ifs

__all__ = ["Fractal", "evaluate_system", "search_category", 
           "ifs_probabilities"]

BURN_IN = 100  # chaos-game points skipped before drawing: the orbit starts at the origin, off the attractor
MAX_COORD = 1e6  # an orbit beyond this is taken as diverging (also catches inf/nan: comparisons fail)


# ---------------------------------------------------------------------------------------- kernels
@njit(cache=True)
def splitmix64(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    # Own PRNG rather than numba's np.random: its state is global per thread, ours is a local
    # variable, so a render cannot depend on anything but its seed.
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True)
def pick_map(cdf: np.ndarray, u: float) -> int:
    # Branch-free count of the cumulative probabilities <= u: the map choice is random, so a
    # scan that stops early mispredicts a branch on almost every point (2x slower).
    j = 0
    for k in range(cdf.shape[0] - 1):
        j += u >= cdf[k]
    return j


@njit(cache=True)
def uniform01(z: np.uint64) -> float:
    return (z >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # top 53 bits -> [0, 1)


MAP_TABLE_BITS = 8  # the map-choice table has 2**8 bins of the random word's top bits


@njit(cache=True)
def map_table(cdf: np.ndarray) -> np.ndarray:
    """Lookup table for ``pick_map_fast``: bin b covers the uniforms ``[b, b + 1) / 2**MAP_TABLE_BITS``
    and holds the map every uniform in it picks, or -1 when a cumulative probability falls inside
    the bin (then the map depends on more than the bin)."""
    nb = 1 << MAP_TABLE_BITS
    table = np.empty(nb, np.int8)
    for b in range(nb):
        lo, hi = b / nb, (b + 1) / nb  # exact: powers of two
        j, split = 0, False
        for k in range(cdf.shape[0] - 1):
            j += cdf[k] <= lo
            split |= (cdf[k] > lo) & (cdf[k] < hi)
        table[b] = -1 if split else j
    return table


@njit(cache=True)
def pick_map_fast(table: np.ndarray, cdf: np.ndarray, z: np.uint64) -> np.uint64:
    """``pick_map(cdf, uniform01(z))``, exactly, by one table lookup for all but the few bins a
    cumulative probability splits. A bin b whose uniforms u all satisfy ``u >= cdf[k]`` or all
    ``u < cdf[k]`` for every k gives the same count for each u, which is the table entry; the
    comparisons per point were a third of the chaos game's time. Returns the map as an unsigned
    index (numba then indexes without the wraparound test of a signed one)."""
    j = table[z >> np.uint64(64 - MAP_TABLE_BITS)]
    if j < 0:
        return np.uint64(pick_map(cdf, uniform01(z)))
    return np.uint64(j)


@njit(cache=True)
def chaos_game_2d(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int):
    """Orbit of the 2-D IFS ``maps`` (N, 6) from the origin, with each point's colour.

    A point's colour is the running average of ``palette[j]`` (N, 3) in [0, 1] over the maps j
    that produced it, so colour follows the IFS structure. It is computed here rather than when
    drawing because its dependency chain then overlaps the orbit's.

    Returns:
        ``(xy (num_points, 2) float64, rgb (num_points, 3) uint8, n_valid)``; points from
        ``n_valid`` on are unset because the orbit diverged there.
    """
    xy = np.empty((num_points, 2))
    rgb = np.empty((num_points, 3), np.uint8)
    table = map_table(cdf)
    state = np.uint64(seed)
    x, y = 0.0, 0.0
    c0, c1, c2 = palette[0, 0], palette[0, 1], palette[0, 2]
    for i in range(num_points):
        state, z = splitmix64(state)
        j = pick_map_fast(table, cdf, z)
        x, y = (maps[j, 0] * x + maps[j, 1] * y + maps[j, 4],
                maps[j, 2] * x + maps[j, 3] * y + maps[j, 5])
        if not (abs(x) <= MAX_COORD and abs(y) <= MAX_COORD):
            return xy, rgb, i
        c0, c1, c2 = 0.5 * (c0 + palette[j, 0]), 0.5 * (c1 + palette[j, 1]), 0.5 * (c2 + palette[j, 2])
        xy[i, 0] = x
        xy[i, 1] = y
        rgb[i, 0] = np.uint8(c0 * 255.0 + 0.5)
        rgb[i, 1] = np.uint8(c1 * 255.0 + 0.5)
        rgb[i, 2] = np.uint8(c2 * 255.0 + 0.5)
    return xy, rgb, num_points


@njit(cache=True)
def _axis_scale(xy: np.ndarray, start: int, stop: int, size: int, margin_px: int):
    """(xmin, ymax, sx, sy, ox, oy): points ``[start, stop)`` go to column ``ox + (x - xmin) sx``
    and row ``oy + (ymax - y) sy``, each axis scaled to ``[margin, size - margin]`` (y up); a
    flat axis lands in the middle."""
    xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
    for i in range(start, stop):
        xmin = min(xmin, xy[i, 0])
        xmax = max(xmax, xy[i, 0])
        ymin = min(ymin, xy[i, 1])
        ymax = max(ymax, xy[i, 1])
    return _box_scale(xmin, xmax, ymin, ymax, size, margin_px)


@njit(cache=True)
def _box_scale(xmin: float, xmax: float, ymin: float, ymax: float, size: int, margin_px: int):
    """``_axis_scale`` of a cloud whose bounding box is known."""
    span = size - 2 * margin_px
    sx = span / (xmax - xmin) if xmax > xmin else 0.0
    sy = span / (ymax - ymin) if ymax > ymin else 0.0
    ox = margin_px if xmax > xmin else size / 2
    oy = margin_px if ymax > ymin else size / 2
    return xmin, ymax, sx, sy, ox, oy


@njit(cache=True)
def _pixels_per_axis(xy: np.ndarray, start: int, stop: int, size: int, margin_px: int):
    """Rows and columns of points ``[start, stop)``, each axis scaled to ``[margin, size - margin]``
    (y up). A flat axis lands in the middle."""
    xmin, ymax, sx, sy, ox, oy = _axis_scale(xy, start, stop, size, margin_px)
    rows = np.empty(stop - start, np.int32)
    cols = np.empty(stop - start, np.int32)
    for i in range(start, stop):
        cols[i - start] = min(int(ox + (xy[i, 0] - xmin) * sx), size - 1)
        rows[i - start] = min(int(oy + (ymax - xy[i, 1]) * sy), size - 1)
    return rows, cols


@njit(cache=True)
def filling_ratio(rows: np.ndarray, cols: np.ndarray, size: int) -> float:
    """Fraction of the ``size`` x ``size`` pixels hit by at least one point."""
    hit = np.zeros((size, size), np.bool_)
    count = 0
    for i in range(rows.shape[0]):
        if not hit[rows[i], cols[i]]:
            hit[rows[i], cols[i]] = True
            count += 1
    return count / (size * size)


@njit(cache=True)
def splat(size: int, rows: np.ndarray, cols: np.ndarray, rgb: np.ndarray, depth: np.ndarray, mask: np.ndarray,
          flip_h: bool, flip_v: bool, shade_min: float) -> np.ndarray:
    """Draw points on black as the odd-sided binary ``mask`` centred on each point.

    Args:
        size: image side.
        rows, cols: (n,) pixel of each point, in orbit order.
        rgb: (n, 3) uint8 colour of each point.
        depth: (n,) in [0, 1], 1 = nearest, or an empty array for no depth. With depth the nearest
            point wins a pixel and its colour is shaded from ``shade_min`` (depth 0) to 1.
        mask: (p, p) bool, the pixels a point covers (a (1, 1) True mask is point mode).
        flip_h, flip_v: mirror the image left-right / top-bottom.

    Returns:
        (size, size, 3) uint8, the same as drawing every point's patch in orbit order with later
        points on top (or, with depth, with a z-test that later points win on ties).
    """
    # Two passes instead of drawing patches: first the winning point per pixel, then each pixel
    # takes the best winner among the pixels whose patches cover it. The same image, but about
    # 5x faster in patch mode than drawing 9 pixels per point with their bounds and depth tests.
    use_depth = depth.shape[0] > 0
    win = np.full((size, size), -1, np.int32)
    zbuf = np.full((size, size) if use_depth else (1, 1), -np.inf)
    for i in range(rows.shape[0]):
        r, c = rows[i], cols[i]
        if use_depth:
            if depth[i] < zbuf[r, c]:
                continue
            zbuf[r, c] = depth[i]
        win[r, c] = i
    offsets = np.argwhere(mask) - mask.shape[0] // 2
    img = np.zeros((size, size, 3), np.uint8)
    for r in range(size):
        for c in range(size):
            best = -1
            for k in range(offsets.shape[0]):
                rr, cc = r - offsets[k, 0], c - offsets[k, 1]
                if rr < 0 or rr >= size or cc < 0 or cc >= size:
                    continue
                j = win[rr, cc]
                if j < 0:
                    continue
                if best < 0:
                    best = j
                elif use_depth:  # nearer wins; on equal depth the later point, as in the first pass
                    if depth[j] > depth[best] or (depth[j] == depth[best] and j > best):
                        best = j
                elif j > best:
                    best = j
            if best < 0:
                continue
            ro = size - 1 - r if flip_v else r
            co = size - 1 - c if flip_h else c
            if use_depth:
                shade = shade_min + (1.0 - shade_min) * depth[best]
                for ch in range(3):
                    img[ro, co, ch] = np.uint8(rgb[best, ch] * shade + 0.5)
            else:
                for ch in range(3):
                    img[ro, co, ch] = rgb[best, ch]
    return img


@njit(cache=True)
def _fill_2d(maps: np.ndarray, cdf: np.ndarray, num_points: int, seed: int, size: int) -> float:
    xy, _, n = chaos_game_2d(maps, cdf, np.ones((maps.shape[0], 3)), num_points, seed)
    if n < num_points:  # diverging systems are never categories
        return 0.0
    rows, cols = _pixels_per_axis(xy, BURN_IN, n, size, 0)
    return filling_ratio(rows, cols, size)


@njit(cache=True)
def _orbit_2d(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int,
              xs: np.ndarray, ys: np.ndarray, rgb: np.ndarray):
    """``chaos_game_2d``'s orbit and colours, bit for bit, for drawing: x and y in separate arrays,
    and the bounding box of the points drawn (from ``BURN_IN`` on) taken on the way, which saves
    a pass over the cloud.

    Written for speed (a 224 px, 100k-point image's orbit took 510 us, now 340 us on a Zen 5
    core): the map by table lookup (``pick_map_fast``); the maps, palette and colours as flat
    arrays indexed by unsigned integers, since numba tests a signed index for wraparound on
    every access (a 2-D colour array indexed so, or a return from inside the loop, made the
    loop three times slower). The arithmetic and its order are ``chaos_game_2d``'s.

    The points go into ``xs``, ``ys`` (at least num_points) and ``rgb`` (at least 3 num_points,
    r, g, b per point), buffers the caller keeps from image to image (``_orbit_buffers``).

    Returns:
        ``(n_valid, xmin, xmax, ymin, ymax)``; the box is (inf, -inf, inf, -inf) when no point from
        ``BURN_IN`` on is valid.
    """
    u = np.uint64
    table = map_table(cdf)
    m = maps.ravel()
    pal = palette.ravel()
    state = np.uint64(seed)
    x, y = 0.0, 0.0
    c0, c1, c2 = palette[0, 0], palette[0, 1], palette[0, 2]
    xmin, xmax, ymin, ymax = np.inf, -np.inf, np.inf, -np.inf
    n = num_points
    for ii in range(num_points):
        i = u(ii)
        state, z = splitmix64(state)
        j = pick_map_fast(table, cdf, z)
        k = j * u(6)
        x, y = (m[k] * x + m[k + u(1)] * y + m[k + u(4)],
                m[k + u(2)] * x + m[k + u(3)] * y + m[k + u(5)])
        if not (abs(x) <= MAX_COORD and abs(y) <= MAX_COORD):
            n = ii
            break
        q = j * u(3)
        c0, c1, c2 = 0.5 * (c0 + pal[q]), 0.5 * (c1 + pal[q + u(1)]), 0.5 * (c2 + pal[q + u(2)])
        xs[i] = x
        ys[i] = y
        rgb[i * u(3)] = np.uint8(c0 * 255.0 + 0.5)
        rgb[i * u(3) + u(1)] = np.uint8(c1 * 255.0 + 0.5)
        rgb[i * u(3) + u(2)] = np.uint8(c2 * 255.0 + 0.5)
        if ii >= BURN_IN:  # the same min / max calls, in the same order, as _axis_scale
            xmin = min(xmin, x)
            xmax = max(xmax, x)
            ymin = min(ymin, y)
            ymax = max(ymax, y)
    return n, xmin, xmax, ymin, ymax


@njit(cache=True)
def _draw_orbit_points(xs: np.ndarray, ys: np.ndarray, rgb: np.ndarray, start: int, stop: int, size: int,
                       margin_px: int, flip_h: bool, flip_v: bool, box: tuple) -> np.ndarray:
    """Point mode without depth in one pass: each point's pixel (the arithmetic of
    ``_pixels_per_axis``, with the scale from the cloud's bounding ``box`` = (xmin, xmax, ymin,
    ymax)) written in orbit order, so the last point on a pixel wins, as in ``splat``; the same
    image without the row / column arrays, the winner map and the pass over every pixel. Flat
    unsigned indexing (no wraparound tests) makes it 40% faster than 2-D indexing."""
    u = np.uint64
    xmin, ymax, sx, sy, ox, oy = _box_scale(box[0], box[1], box[2], box[3], size, margin_px)
    img = np.zeros(size * size * 3, np.uint8)
    last = size - 1
    for ii in range(start, stop):
        i = u(ii)
        c = min(int(ox + (xs[i] - xmin) * sx), last)
        r = min(int(oy + (ymax - ys[i]) * sy), last)
        if flip_v:
            r = last - r
        if flip_h:
            c = last - c
        k = u(r * size + c) * u(3)
        img[k] = rgb[i * u(3)]
        img[k + u(1)] = rgb[i * u(3) + u(1)]
        img[k + u(2)] = rgb[i * u(3) + u(2)]
    return img.reshape((size, size, 3))


@njit(cache=True)
def _render_2d(maps: np.ndarray, cdf: np.ndarray, palette: np.ndarray, num_points: int, seed: int, size: int,
               margin_px: int, mask: np.ndarray, flip_h: bool, flip_v: bool, xs: np.ndarray, ys: np.ndarray,
               rgb: np.ndarray) -> np.ndarray:
    n, xmin, xmax, ymin, ymax = _orbit_2d(maps, cdf, palette, num_points, seed, xs, ys, rgb)
    start = min(BURN_IN, n)
    if mask.shape[0] == 1:  # point mode
        return _draw_orbit_points(xs, ys, rgb, start, n, size, margin_px, flip_h, flip_v, (xmin, xmax, ymin, ymax))
    xmin, ymax, sx, sy, ox, oy = _box_scale(xmin, xmax, ymin, ymax, size, margin_px)
    rows = np.empty(n - start, np.int32)
    cols = np.empty(n - start, np.int32)
    for i in range(start, n):  # _pixels_per_axis's arithmetic
        cols[i - start] = min(int(ox + (xs[i] - xmin) * sx), size - 1)
        rows[i - start] = min(int(oy + (ymax - ys[i]) * sy), size - 1)
    return splat(size, rows, cols, rgb[:3 * n].reshape((n, 3))[start:], np.empty(0), mask, flip_h, flip_v, 1.0)


# Scratch memory for the orbit, one set per thread, reused from image to image: 100k points are
# 1.9 MB, and allocating them per image cost 430 page faults (as much time as the orbit itself
# on a loaded machine, since glibc returns such blocks to the system on every free).
_scratch = threading.local()


def _orbit_buffers(num_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's (xs, ys, rgb) buffers for ``_orbit_2d``, grown to ``num_points``."""
    bufs = getattr(_scratch, "orbit", None)
    if bufs is None or bufs[0].shape[0] < num_points:
        bufs = (np.empty(num_points), np.empty(num_points), np.empty(3 * num_points, np.uint8))
        _scratch.orbit = bufs
    return bufs


# ------------------------------------------------------------------------------ shared helpers
def ifs_probabilities(maps: np.ndarray) -> np.ndarray:
    """Map probabilities ``|det| / sum |det|`` of the linear parts of ``maps`` (N, 6) or (N, 12):
    FractalDB's rule, which visits each map in proportion to the area (volume) it covers.
    All-zero determinants give zeros (such a system is degenerate)."""
    # Determinants written out and summed exactly (fsum) rather than np.linalg.det (LAPACK LU)
    # and np.sum: probabilities set the map choice of every point, so they must round the same
    # on every machine.
    m = np.asarray(maps, np.float64)
    if m.shape[1] == 6:
        dets = np.abs(m[:, 0] * m[:, 3] - m[:, 1] * m[:, 2])
    else:
        dets = np.abs(m[:, 0] * (m[:, 4] * m[:, 8] - m[:, 5] * m[:, 7])
                      - m[:, 1] * (m[:, 3] * m[:, 8] - m[:, 5] * m[:, 6])
                      + m[:, 2] * (m[:, 3] * m[:, 7] - m[:, 4] * m[:, 6]))
    total = math.fsum(dets.tolist())
    return dets / total if total > 0 else np.zeros_like(dets)


def cdf_of(probs) -> np.ndarray:
    """Cumulative probabilities for the kernels' map choice, normalised, the last one exactly 1."""
    probs = [float(q) for q in probs]
    total, acc, cdf = math.fsum(probs), 0.0, []
    for q in probs:
        acc += q
        cdf.append(acc / total)
    cdf[-1] = 1.0
    return np.array(cdf)


def perturb_one(maps: np.ndarray, rng: np.random.Generator, weights: tuple[float, ...]) -> tuple[np.ndarray, dict]:
    """Multiply one parameter of one map by a weight from ``weights`` (FractalDB's intra-category
    variation). Returns the new maps and what was changed."""
    j, p = int(rng.integers(maps.shape[0])), int(rng.integers(maps.shape[1]))
    w = float(weights[int(rng.integers(len(weights)))])
    out = maps.copy()
    out[j, p] *= w
    return out, {"map": j, "param": p, "weight": w}


def draw_palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` saturated, bright colours (n, 3) in [0, 1]: random RGB is often too dark on black."""
    hsv = np.stack([rng.random(n), rng.uniform(0.5, 1.0, n), rng.uniform(0.7, 1.0, n)], axis=1)
    return np.array([colorsys.hsv_to_rgb(*c) for c in hsv])


def draw_patch(rng: np.random.Generator, patch_size: int) -> np.ndarray:
    """A random binary ``patch_size`` x ``patch_size`` pattern with its centre set."""
    mask = rng.random((patch_size, patch_size)) < 0.5
    mask[patch_size // 2, patch_size // 2] = True
    return mask


def check_instance_args(name: str, label: int, num_classes: int, instance: int) -> None:
    """Raise a ValueError naming generator ``name`` for a label or instance out of range."""
    if not 0 <= label < num_classes:
        raise ValueError(f"{name}: label {label} outside [0, {num_classes}); use 0 <= label < num_classes")
    if instance < 0:
        raise ValueError(f"{name}: instance {instance} must be >= 0")


def check_categories(name: str, categories: list, num_classes: int, num_params: int) -> list[dict]:
    """Validate a ``categories=`` list; returns its entries with float-list maps and probs."""
    if not isinstance(categories, (list, tuple)) or len(categories) != num_classes:
        got = len(categories) if isinstance(categories, (list, tuple)) else type(categories).__name__
        raise ValueError(f"{name}: categories= has {got} entries but num_classes={num_classes}; pass one "
                         f"entry per class (e.g. the first {num_classes} entries of a saved set)")
    out = []
    for k, cat in enumerate(categories):
        maps = np.asarray(cat.get("maps") if isinstance(cat, dict) else None, dtype=np.float64)
        if maps.ndim != 2 or maps.shape[0] < 1 or maps.shape[1] != num_params or not np.isfinite(maps).all():
            raise ValueError(f"{name}: categories[{k}]['maps'] must be a non-empty list of finite rows of "
                             f"{num_params} numbers, got shape {maps.shape}")
        probs = np.asarray(cat.get("probs", ifs_probabilities(maps)), dtype=np.float64)
        if probs.shape != (maps.shape[0],) or not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"{name}: categories[{k}]['probs'] must be {maps.shape[0]} non-negative numbers "
                             f"with a positive sum, got {probs.tolist()}")
        # Probabilities are kept as given (cdf_of normalises them), so that a saved and reloaded
        # set renders exactly as the search's own result.
        out.append({**cat, "maps": maps.tolist(), "probs": probs.tolist()})
    return out


# ------------------------------------------------------------------------------------- search
def evaluate_system(maps: np.ndarray, probs: np.ndarray | None = None, *, fill_threshold: float = 0.2,
                    search_size: int = 128, search_points: int = 6000, chaos_seed: int = 0) -> tuple[float, bool]:
    """FractalDB's acceptance test of one 2-D IFS.

    Args:
        maps: (N, 6) affine maps (a, b, c, d, e, f).
        probs: map probabilities; ``|det|``-proportional when None.
        fill_threshold: smallest accepted filling ratio.
        search_size: side of the image the ratio is measured on.
        search_points: chaos-game points rendered.
        chaos_seed: seed of the chaos game.

    Returns:
        ``(filling ratio, accepted)``; a diverging or degenerate system has ratio 0.
    """
    maps = np.ascontiguousarray(maps, np.float64)
    probs = ifs_probabilities(maps) if probs is None else np.asarray(probs, np.float64)
    if not math.fsum(probs.tolist()) > 0:
        return 0.0, False
    fill = float(_fill_2d(maps, cdf_of(probs), search_points, chaos_seed, search_size))
    return fill, fill >= fill_threshold


def search_ifs(evaluate: Callable[..., tuple[float, bool]], params_per_map: int, seed: int, label: int, *,
               min_maps: int, max_maps: int, fill_threshold: float, search_size: int, search_points: int,
               max_tries: int) -> dict:
    """Find category ``label``'s IFS: random candidates (``params_per_map`` parameters per map, each
    uniform in [-1, 1]) from ``instance_rng(seed, label, 0, stream=1)`` until one passes ``evaluate``
    (``evaluate_system`` or its 3-D analogue). A pure function of its arguments.

    Returns:
        ``{"maps": (N, params_per_map) list, "probs": N list, "fill": ratio, "tries": candidates
        drawn, "search_seed": the chaos-game seed the ratio was measured with}``.
    """
    rng = instance_rng(seed, label, 0, stream=1)
    for tries in range(1, max_tries + 1):
        n = int(rng.integers(min_maps, max_maps + 1))
        maps = rng.uniform(-1.0, 1.0, size=(n, params_per_map))
        chaos_seed = int(rng.integers(2**63))
        probs = ifs_probabilities(maps)
        fill, ok = evaluate(maps, probs, fill_threshold=fill_threshold, search_size=search_size,
                            search_points=search_points, chaos_seed=chaos_seed)
        if ok:
            return {"maps": maps.tolist(), "probs": probs.tolist(), "fill": fill, "tries": tries,
                    "search_seed": chaos_seed}
    dim = {6: "2-D", 12: "3-D"}.get(params_per_map, f"{params_per_map}-parameter")
    raise ValueError(f"no {dim} IFS with filling ratio >= fill_threshold={fill_threshold} among {max_tries} "
                     f"candidates for class {label}; lower fill_threshold or raise max_tries")


def search_category(seed: int, label: int, *, min_maps: int = 2, max_maps: int = 8, fill_threshold: float = 0.2,
                    search_size: int = 128, search_points: int = 6000, max_tries: int = 100_000) -> dict:
    """Category ``label``'s 2-D IFS (``search_ifs`` with ``evaluate_system``)."""
    return search_ifs(evaluate_system, 6, seed, label, min_maps=min_maps, max_maps=max_maps,
                      fill_threshold=fill_threshold, search_size=search_size, search_points=search_points,
                      max_tries=max_tries)


# ---------------------------------------------------------------------------------- generator
@register_generator("fractal")
class Fractal:
    """FractalDB images; see the module docstring for what a category and an instance are.

    ``exfractal.ExFractal`` derives from it: same arguments, category search and caching,
    with 3-D maps (``map_params``, ``search``) and views instead of flips.

    Args:
        num_classes, image_size, seed: the generator contract.
        num_points: chaos-game points per image (100k as published).
        mode: "point" (one pixel per point) or "patch" (a ``patch_size`` patch per point).
        patch_size: odd side of the patch in patch mode.
        color: coloured points (True) or white ones (False).
        margin: empty border on each side, as a fraction of the image side.
        weights: the grid one parameter per instance is multiplied by.
        min_maps, max_maps: range of the number of maps N of a category.
        fill_threshold, search_size, search_points, max_tries: the category search.
        categories: a saved category set (``categories()``) to use instead of searching.
    """

    name = "fractal"
    map_params = 6  # a, b, c, d, e, f of a 2-D affine map
    search = staticmethod(search_category)

    def __init__(self, num_classes: int, image_size: int, seed: int, num_points: int = 100_000,
                 mode: Literal["point", "patch"] = "point", patch_size: int = 3, color: bool = True,
                 margin: float = 0.05, weights: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2),
                 min_maps: int = 2, max_maps: int = 8, fill_threshold: float = 0.2, search_size: int = 128,
                 search_points: int = 6000, max_tries: int = 100_000, categories: list[dict] | None = None):
        if num_classes < 1 or image_size < 8:
            raise ValueError(f"{self.name} needs num_classes >= 1 and image_size >= 8, got {num_classes}, {image_size}")
        if num_points <= BURN_IN:
            raise ValueError(f"{self.name}: num_points={num_points} must exceed the burn-in of {BURN_IN} points")
        if mode not in ("point", "patch"):
            raise ValueError(f"{self.name}: mode={mode!r} must be 'point' or 'patch'")
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"{self.name}: patch_size={patch_size} must be odd and >= 1 (3 as published)")
        if not 0 <= margin < 0.5:
            raise ValueError(f"{self.name}: margin={margin} must be in [0, 0.5)")
        if not 1 <= min_maps <= max_maps:
            raise ValueError(f"{self.name}: need 1 <= min_maps <= max_maps, got {min_maps}, {max_maps}")
        if not weights or any(not np.isfinite(w) for w in weights):
            raise ValueError(f"{self.name}: weights={weights} must be a non-empty list of finite numbers")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.num_points, self.mode, self.patch_size, self.color = num_points, mode, patch_size, color
        self.margin_px = int(round(margin * image_size))
        self.weights = tuple(float(w) for w in weights)
        self._search_kwargs = {"min_maps": min_maps, "max_maps": max_maps, "fill_threshold": fill_threshold,
                        "search_size": search_size, "search_points": search_points, "max_tries": max_tries}
        # Categories are searched lazily, one at a time, and cached: each is a pure function of
        # (seed, label), so the cache cannot make an image depend on call order.
        self._categories: dict[int, dict] = {}
        if categories is not None:
            self._categories = dict(enumerate(check_categories(self.name, categories, num_classes, self.map_params)))

    def category(self, label: int) -> dict:
        """Category ``label``'s IFS (searched on first use)."""
        check_instance_args(self.name, label, self.num_classes, 0)
        if label not in self._categories:
            self._categories[label] = type(self).search(self.seed, label, **self._search_kwargs)
        return self._categories[label]

    def categories(self) -> list[dict]:
        """One JSON-serialisable entry per class: maps, probs, filling ratio and candidates tried."""
        return [self.category(k) for k in range(self.num_classes)]

    def params(self, label: int, instance: int) -> dict:
        check_instance_args(self.name, label, self.num_classes, instance)
        cat = self.category(label)
        rng = instance_rng(self.seed, label, instance)
        chaos_seed = int(rng.integers(2**63))
        maps, perturb = perturb_one(np.array(cat["maps"]), rng, self.weights)
        flip_h, flip_v = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        palette = draw_palette(rng, maps.shape[0])
        patch = draw_patch(rng, self.patch_size) if self.mode == "patch" else np.ones((1, 1), bool)
        return {"maps": maps.tolist(), "probs": list(cat["probs"]), "perturb": perturb, "flip_h": flip_h,
                "flip_v": flip_v, "palette": palette.tolist(), "patch": patch.astype(int).tolist(),
                "chaos_seed": chaos_seed}

    def draw(self, p: dict) -> np.ndarray:
        """Render from a ``params()`` dict (also one read back from a shard's JSON)."""
        palette = np.array(p["palette"]) if self.color else np.ones((len(p["maps"]), 3))
        return _render_2d(np.array(p["maps"], np.float64), cdf_of(p["probs"]), palette, self.num_points,
                          p["chaos_seed"], self.image_size, self.margin_px, np.array(p["patch"], np.bool_),
                          p["flip_h"], p["flip_v"], *_orbit_buffers(self.num_points))

    def render(self, label: int, instance: int) -> np.ndarray:
        return self.draw(self.params(label, instance))

    def render_batch(self, labels: torch.Tensor, instances: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images ``instances[i]`` of classes ``labels[i]`` rendered together on ``device``
        (``synthetic.device.render_ifs``, from the same ``params()``): uint8 (B, 3, H, W)."""
        ps = [self.params(int(k), int(i)) for k, i in zip(labels.tolist(), instances.tolist())]
        return render_ifs(ps, [cdf_of(p["probs"]) for p in ps], self.num_points, BURN_IN, self.image_size, self.margin_px, self.color, device)
