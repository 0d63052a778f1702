"""Stroking polylines into images: the drawing primitive of the curve generators.

RCDB, VisualAtom and the Bezier curves all reduce an image to "draw these polylines with
these widths and colours"; this module does that with one numba kernel, so the
generators only compute vertices.

Conventions:
- coordinates are float pixels, x to the right and y down, with pixel (row i, column j)
  centred at (x, y) = (j, i), as in PIL's ImageDraw;
- a stroke of width w covers the points within w / 2 of the polyline (round caps and
  joins). Anti-aliased, a pixel's coverage is ``clip(w / 2 + 0.5 - d, 0, 1)`` with d the
  distance of its centre to the polyline; strokes thinner than one pixel are drawn one
  pixel wide at coverage w, so hairlines fade instead of breaking up. Without
  anti-aliasing a pixel is either covered (d <= max(w, 1) / 2) or not;
- strokes are painted over the image in order, coverage acting as alpha. Within one
  polyline a pixel keeps its *maximum* coverage over the segments (a per-polyline
  coverage buffer), so the overlapping ends of consecutive segments neither darken the
  joins nor thicken dense curves built from many short segments.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit

__all__ = ["stroke_polyline", "stroke_polylines"]


@njit(cache=True)
def _stroke_polylines(img, xs, ys, offsets, closed, widths, colors, antialias, round_offset, near, touched):
    h, w = img.shape[0], img.shape[1]
    u = np.uint64  # unsigned indices: numba tests signed ones for wraparound on every access
    flat = img.reshape(h * w * 3)
    # Per polyline, each pixel's smallest squared distance d2 to its segments in `near` (inf:
    # none within reach; all inf on entry and again on return), and the pixels that got one in
    # `touched` (flat indices, one spare slot: the inner loop writes the next entry
    # unconditionally), so compositing and clearing cost the stroke's area, not the image's.
    # Coverage falls as d2 grows, so the coverage of the smallest d2 is the largest coverage
    # over the segments, exactly: one square root per pixel instead of one per pixel and segment.
    for p in range(offsets.shape[0] - 1):
        start, n = offsets[p], offsets[p + 1] - offsets[p]
        if n == 0:
            continue
        width = widths[p]
        half = 0.5 * max(width, 1.0)
        strength = min(width, 1.0) if antialias else 1.0
        reach = half + 0.5 if antialias else half  # beyond it coverage is 0
        # Squared distances that can give coverage > 0 lie below reach**2 (the margin covers the
        # rounding of the square root); those above are not kept.
        keep2 = reach * reach * (1.0 + 1e-9)
        nseg = n if (closed and n > 2) else max(n - 1, 1)  # one point: a dot
        nt = 0
        for s in range(nseg):
            a, b = u(start + s), u(start + (s + 1) % n)
            ax, ay, dx, dy = xs[a], ys[a], xs[b] - xs[a], ys[b] - ys[a]
            len2 = dx * dx + dy * dy
            inv_len2 = 1.0 / len2 if len2 > 0.0 else 0.0
            inv_dy = 1.0 / dy if abs(dy) >= 1e-12 else 0.0
            strip = reach * math.sqrt(len2) * abs(inv_dy)  # half its width along a row
            y0 = max(0, int(math.ceil(min(ay, ay + dy) - reach)))
            y1 = min(h - 1, int(math.floor(max(ay, ay + dy) + reach)))
            for y in range(y0, y1 + 1):
                # Segment points within `reach` rows of y span parameters [t0, t1];
                # only x within `reach` of their x range can be covered.
                if inv_dy == 0.0:
                    t0, t1 = 0.0, 1.0
                else:
                    t0, t1 = (y - reach - ay) * inv_dy, (y + reach - ay) * inv_dy
                    t0, t1 = max(min(t0, t1), 0.0), min(max(t0, t1), 1.0)  # ordered, without a branch
                    if t0 > t1:
                        continue
                xa, xb = ax + t0 * dx, ax + t1 * dx
                lo, hi = min(xa, xb) - reach, max(xa, xb) + reach
                if inv_dy != 0.0:
                    # Also within `reach` of the segment's line: a strip about it.
                    xc = ax + (y - ay) * dx * inv_dy
                    lo, hi = max(lo, xc - strip), min(hi, xc + strip)
                x0 = max(0, int(math.ceil(lo)))
                x1 = min(w - 1, int(math.floor(hi)))
                py = y - ay
                row = y * w
                # Most rows hold 2 pixels of a segment (VisualAtom: 60%, 1-3 pixels: 86%): the
                # first two are evaluated unconditionally, one that lies past x1 (or outside the
                # image) counting as out of reach, so the loop below runs only for wider rows
                # (10% faster than one loop with its unpredictable trip count).
                for x in range(x0, x0 + 2):
                    px = x - ax
                    t = min(max((px * dx + py * dy) * inv_len2, 0.0), 1.0)
                    ex, ey = px - t * dx, py - t * dy
                    d2 = ex * ex + ey * ey
                    d2 = d2 if (d2 < keep2) & (x <= x1) else np.inf
                    # Branch-free on purpose: whether a pixel is inside, and whether it is
                    # new, is unpredictable, and mispredictions dominated this loop.
                    k = row + min(x, w - 1)
                    old = near[u(k)]
                    touched[u(nt)] = k
                    nt += (old == np.inf) & (d2 < np.inf)
                    near[u(k)] = min(old, d2)
                for x in range(x0 + 2, x1 + 1):
                    px = x - ax
                    t = min(max((px * dx + py * dy) * inv_len2, 0.0), 1.0)
                    ex, ey = px - t * dx, py - t * dy
                    d2 = ex * ex + ey * ey
                    d2 = d2 if d2 < keep2 else np.inf
                    k = row + x
                    old = near[u(k)]
                    touched[u(nt)] = k
                    nt += (old == np.inf) & (d2 < np.inf)
                    near[u(k)] = min(old, d2)
        cr, cg, cb = colors[p, 0], colors[p, 1], colors[p, 2]
        for i in range(nt):
            k = u(touched[u(i)])
            d2 = near[k]
            near[k] = np.inf
            if antialias:
                c = min(max(half + 0.5 - math.sqrt(d2), 0.0), 1.0) * strength
            else:
                c = 1.0 if d2 <= half * half else 0.0
            if c > 0.0:
                q = k * u(3)
                flat[q] = flat[q] * (1.0 - c) + cr * c + round_offset
                flat[q + u(1)] = flat[q + u(1)] * (1.0 - c) + cg * c + round_offset
                flat[q + u(2)] = flat[q + u(2)] * (1.0 - c) + cb * c + round_offset


# Scratch memory of the kernel, one pair per thread, reused from call to call: allocated per
# call, the two 400 kB buffers of a 224 px image cost 200 page faults (glibc returns blocks that
# large to the system on every free).
_scratch = threading.local()


def _stroke_buffers(num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's (near, touched) buffers for ``_stroke_polylines``; ``near`` is all inf."""
    bufs = getattr(_scratch, "stroke", None)
    if bufs is None or bufs[0].shape[0] < num_pixels:
        bufs = (np.full(num_pixels, np.inf), np.empty(num_pixels + 1, np.int64))
        _scratch.stroke = bufs
    return bufs


def _check_image(img: np.ndarray) -> float:
    if img.ndim != 3 or img.shape[2] != 3 or not img.flags.c_contiguous:
        raise ValueError(f"image must be a C-contiguous (H, W, 3) array, got shape {img.shape}")
    if img.dtype == np.uint8:
        return 0.5  # round to nearest when the kernel stores floats into uint8
    if img.dtype in (np.float32, np.float64):
        return 0.0
    raise ValueError(f"image dtype must be uint8, float32 or float64, got {img.dtype}")


def stroke_polylines(img: np.ndarray, xs: np.ndarray, ys: np.ndarray, offsets: np.ndarray,
                     widths: np.ndarray, colors: np.ndarray, closed: bool = False,
                     antialias: bool = True) -> None:
    """Draw many polylines in one call, in order, each over the ones before (in place).

    Args:
        img: (H, W, 3) uint8 or float image, C-contiguous; modified in place.
        xs, ys: (N,) vertex coordinates of all polylines, concatenated (float pixels).
        offsets: (P + 1,) int; polyline p has vertices ``offsets[p]:offsets[p + 1]``.
        widths: (P,) stroke width of each polyline in pixels.
        colors: (P, 3) RGB of each polyline, in the image's units (0..255 for uint8).
        closed: connect each polyline's last vertex back to its first (polygons).
        antialias: coverage from the distance to the polyline; else hard edges.
    """
    round_offset = _check_image(img)
    xs, ys = np.ascontiguousarray(xs, np.float64), np.ascontiguousarray(ys, np.float64)
    offsets = np.ascontiguousarray(offsets, np.int64)
    widths = np.ascontiguousarray(widths, np.float64)
    colors = np.ascontiguousarray(colors, np.float64).reshape(-1, 3)
    num = offsets.shape[0] - 1
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"xs and ys must be 1-D arrays of one length, got {xs.shape} and {ys.shape}")
    if num < 0 or offsets[0] != 0 or offsets[-1] != xs.shape[0] or np.any(np.diff(offsets) < 0):
        raise ValueError(f"offsets must rise from 0 to len(xs)={xs.shape[0]}, got {offsets.tolist()[:8]}...")
    if widths.shape != (num,) or colors.shape != (num, 3):
        raise ValueError(f"{num} polylines need widths of shape ({num},) and colors of shape ({num}, 3), "
                         f"got {widths.shape} and {colors.shape}")
    _stroke_polylines(img, xs, ys, offsets, bool(closed), widths, colors, bool(antialias), round_offset,
                      *_stroke_buffers(img.shape[0] * img.shape[1]))


def stroke_polyline(img: np.ndarray, points: np.ndarray, width: float, color, closed: bool = False,
                    antialias: bool = True) -> None:
    """Draw one polyline (in place); ``points`` is (N, 2) as (x, y). See ``stroke_polylines``."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    stroke_polylines(img, points[:, 0], points[:, 1], np.array([0, len(points)]), np.array([width]),
                     np.asarray(color, np.float64).reshape(1, 3), closed=closed, antialias=antialias)
