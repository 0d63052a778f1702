"""Batched torch kernels that render synthetic images on the training device (``data.render=device``).

A generator with device kernels offers ``render_batch(labels, instances, device) -> uint8 (B, 3, H, W)``
on ``device``: it draws each image's parameters on the host exactly as ``render`` does (``params`` /
``_draws``, numpy streams from ``instance_rng``: microseconds per image) and hands them to one of the
kernels here, which render the whole micro-batch at once as tensor operations. The images agree
with the numba renderer's in what matters, the occupancy of the attractor / contours / orbits
(float32 here, float64 there; the colour of a pixel where points or strokes tie may differ).

- ``chaos_game``: the IFS orbits of FractalDB / ExFractalDB as up to ``MAX_CHAINS`` short chains per
  image run side by side instead of one long chain, so every step is one (B, chains) tensor
  operation. Each chain takes the CPU renderer's own map choices for its stretch of the orbit
  (splitmix64 is counter-based: its i-th number is computed directly) and starts ``CHAIN_BURN_IN``
  steps early from the origin, so it lands on the CPU's orbit: the points are the CPU's, in its
  order. An image depends only on its parameters, not on the batch, device or rank rendering it.
- ``splat_points``: points to pixels through an int64 ``scatter_reduce(amax)`` of a packed
  (depth, order, colour) key per point: exact and order-independent, hence deterministic on CUDA,
  where float ``index_put_(accumulate=True)`` / ``scatter_add_`` are not. The later (or, with depth,
  nearer) point wins a pixel, as in the numba ``splat``.
- ``stroke_closed_polylines``: RCDB's and VisualAtom's strokes with ``draw.stroke_polylines``'s
  coverage rule (distance of the pixel centre to the segment, per-polyline maximum, polylines
  composited in order), the pixels near a segment found from samples every ``SAMPLE_SPACING_PX``
  along it rather than a scan line per segment.
- ``perlin_fields``: ``perlin._render_kernel``'s octaves of gradient noise for every pixel of the
  batch at once, per image min-max normalised and colour-mapped.

torch has no chaos-game, point-splat or polyline-stroke operator (torchvision's draw utilities are
per-image PIL calls), hence these kernels. They run on CPU too (that is how the tests run them).
"""
from __future__ import annotations

import math

import torch

__all__ = ["chaos_game", "splat_points", "stroke_closed_polylines", "chain_layout", "splitmix_uniform", "render_ifs",
           "stroke_batch", "perlin_fields"]

MAX_CHAINS = 1024  # chains per image at most: the width of each step's tensor op is B x chains
STEPS_PER_CHAIN = 512  # drawn steps per chain (at least), so the burn-in below costs a quarter more steps
CHAIN_BURN_IN = 128  # steps a chain runs before it draws, falling onto the CPU's orbit from the origin: at 32
# (64), 15% (1.6%) of the points of some ExFractalDB systems were still more than 0.1% of the cloud off it, at 128 none
MAX_COORD = 1e6  # as fractal.MAX_COORD: an orbit beyond this is taken as diverging
SAMPLE_SPACING_PX = 0.5  # stroke samples along a segment; a pixel's nearest sample is <= 0.25 px from its nearest point

_M64 = 1 << 64
_GAMMA = 0x9E3779B97F4A7C15 - _M64  # splitmix64's constants as int64 (torch has no uint64 arithmetic)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9 - _M64, 0x94D049BB133111EB - _M64


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix_uniform(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1): the ``index``-th (0-based) number of ``fractal.splitmix64`` / ``uniform01``'s
    stream from ``seeds``, computed directly (splitmix64's state after i + 1 calls is
    seed + (i + 1) * gamma), so any step of the CPU renderer's chaos game can be drawn out of order.
    int64 products wrap modulo 2^64 on every torch device, as uint64 ones do in numba."""
    z = seeds + (index + 1) * _GAMMA
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * (1.0 / 9007199254740992.0)


def chain_layout(num_points: int, burn_in: int) -> tuple[int, int]:
    """(chains, drawn steps per chain) covering the CPU renderer's drawn points ``[burn_in, num_points)``."""
    chains = max(1, min(MAX_CHAINS, (num_points - burn_in) // STEPS_PER_CHAIN))
    return chains, -(-(num_points - burn_in) // chains)


def chaos_game(maps: torch.Tensor, cdf: torch.Tensor, palette: torch.Tensor, seeds: torch.Tensor, num_points: int,
               burn_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU renderer's orbits (``fractal.chaos_game_2d`` / ``exfractal.chaos_game_3d``) of B iterated
    function systems, its points ``[burn_in, num_points)`` computed as parallel chains.

    Chain k draws the points ``burn_in + k L + [0, L)``; it starts from the origin ``CHAIN_BURN_IN``
    steps earlier and takes the *same* map choices as the CPU's single chain (the same splitmix64
    numbers, drawn by index), so on a contracting system it has fallen onto the CPU orbit, colour
    included (the running colour average halves the start's weight each step), by its first drawn
    point. The points thus are the CPU's up to float32 rounding, in the CPU's order.

    Args:
        maps: (B, N, 6) 2-D maps (a, b, c, d, e, f) or (B, N, 12) 3-D maps (A row-major, t), float32;
            systems with fewer maps are padded (their padding is never chosen).
        cdf: (B, N) float64 cumulative map probabilities (``fractal.cdf_of``), padding 2.
        palette: (B, N, 3) map colours in [0, 1].
        seeds: (B,) int64 chaos seeds (``params()["chaos_seed"]``).
        num_points, burn_in: the CPU renderer's orbit length and its skipped start.

    Returns:
        ``(points (B, dim, M) float32, rgb (B, M) int64 packed 0xRRGGBB, index (B, M) int64)``: each
        point's position, colour and index in the CPU orbit, -1 for points not drawn (past
        ``num_points``, or from where the orbit diverged, as the CPU renderer stops there).
    """
    b, n, p = maps.shape
    dim = 2 if p == 6 else 3
    device = maps.device
    chains, steps = chain_layout(num_points, burn_in)
    lin = maps[..., :dim * dim].reshape(b, n, dim, dim)
    shift = maps[..., dim * dim:]
    seeds = seeds.to(device=device, dtype=torch.int64)[:, None]  # (B, 1)
    first = burn_in + torch.arange(chains, device=device, dtype=torch.int64) * steps - CHAIN_BURN_IN  # (chains,)
    x = torch.zeros(b, chains, dim, device=device)
    colour = palette[:, :1, :].expand(b, chains, 3).clone()
    never = torch.full((), 1 << 62, dtype=torch.int64, device=device)
    diverged = never.expand(b, chains).clone()  # (B, chains): CPU index of the first diverging step
    points = torch.empty(steps, b, dim, chains, device=device)
    rgb = torch.empty(steps, b, chains, dtype=torch.int64, device=device)
    rows = torch.arange(b, device=device)[:, None]
    zero = torch.zeros((), device=device)
    for t in range(CHAIN_BURN_IN + steps):
        g = first + t  # (chains,) CPU step index
        u = splitmix_uniform(seeds, g.clamp(min=0)[None])  # (B, chains)
        j = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)  # the count of cdf <= u: pick_map
        a, s = lin[rows, j], shift[rows, j]  # (B, chains, dim, dim), (B, chains, dim)
        # Products and sums written out in a fixed order (no matmul, no reduction): the same
        # rounding whatever the batch.
        nx = s.clone()
        for c in range(dim):
            nx = nx + a[..., c] * x[:, :, None, c]
        started = (g >= 0)[None, :, None]  # a chain of a short burn-in waits at the origin
        bad = ~(nx.abs() <= MAX_COORD).all(-1) & started[..., 0]  # also True for nan
        diverged = torch.where(bad & (diverged == never), g[None].expand(b, chains), diverged)
        x = torch.where(started & ~bad[..., None], nx, torch.where(started, zero, x))
        colour = torch.where(started, 0.5 * (colour + palette[rows, j]), colour)
        if t >= CHAIN_BURN_IN:
            k = t - CHAIN_BURN_IN
            points[k] = x.transpose(1, 2)
            c = (colour * 255.0 + 0.5).to(torch.int64)
            rgb[k] = (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]
    m = steps * chains
    index = (burn_in + torch.arange(m, device=device, dtype=torch.int64).view(chains, steps).t()).reshape(1, m)
    stop = torch.minimum(diverged.amin(1, keepdim=True), torch.full((), num_points, device=device))  # (B, 1)
    index = torch.where(index < stop, index, torch.full((), -1, dtype=torch.int64, device=device))
    # (steps, B, ., chains) -> (B, ., steps * chains), point t * chains + k = step t of chain k
    return (points.permute(1, 2, 0, 3).reshape(b, dim, m), rgb.permute(1, 0, 2).reshape(b, m), index)


def splat_points(rows: torch.Tensor, cols: torch.Tensor, rgb: torch.Tensor, index: torch.Tensor, size: int,
                 depth: torch.Tensor | None = None, shade_min: float = 1.0, patches: torch.Tensor | None = None,
                 flip_h: torch.Tensor | None = None, flip_v: torch.Tensor | None = None) -> torch.Tensor:
    """Draw points on black as ``fractal.splat`` does: uint8 (B, 3, size, size).

    Args:
        rows, cols: (B, M) int64 pixel of each point, in [0, size).
        rgb: (B, M) int64 packed colours 0xRRGGBB.
        index: (B, M) int64 order of the points (the later wins a pixel), -1 = not drawn; below 2^20.
        depth: (B, M) in [0, 1] (1 = nearest) or None; with depth the nearest point wins a pixel (the
            later one on a tie) and is shaded from ``shade_min`` (depth 0) to 1.
        patches: (B, p, p) bool, the pixels around a point it covers (patch mode), or None / (B, 1, 1).
        flip_h, flip_v: (B,) bool mirrors, or None.
    """
    b, m = rows.shape
    device = rows.device
    # Key = (depth in 18 bits, index in 20 bits, colour in 24 bits): amax picks the winner and carries
    # its colour, independently of the order the points are reduced in.
    key = (index << 24) | rgb
    if depth is not None:
        key = key | ((depth.clamp(0, 1) * ((1 << 18) - 1)).to(torch.int64) << 44)
    key = torch.where(index >= 0, key, torch.full((), -1, dtype=torch.int64, device=device))
    flat = (torch.arange(b, device=device)[:, None] * size + rows) * size + cols
    win = torch.full((b * size * size,), -1, dtype=torch.int64, device=device)
    win.scatter_reduce_(0, flat.reshape(-1), key.reshape(-1), reduce="amax")
    win = win.view(b, size, size)
    if patches is not None and patches.shape[-1] > 1:
        # A pixel takes the best winner among the pixels whose patch covers it (numba splat's second pass).
        p = patches.shape[-1]
        half = p // 2
        padded = torch.nn.functional.pad(win, (half, half, half, half), value=-1)
        best = torch.full_like(win, -1)
        for dr in range(p):
            for dc in range(p):
                # the point at (r - (dr - half), c - (dc - half)) covers (r, c) through patch pixel (dr, dc)
                shifted = padded[:, p - 1 - dr:p - 1 - dr + size, p - 1 - dc:p - 1 - dc + size]
                use = patches[:, dr, dc].to(device)[:, None, None]
                best = torch.where(use, torch.maximum(best, shifted), best)
        win = best
    hit = win >= 0
    colour = torch.stack([(win >> 16) & 255, (win >> 8) & 255, win & 255], dim=1).to(torch.float32)  # (B, 3, H, W)
    if depth is not None:
        d = ((win >> 44) & ((1 << 18) - 1)).to(torch.float32) / ((1 << 18) - 1)
        colour = colour * (shade_min + (1.0 - shade_min) * d)[:, None]
    img = torch.where(hit[:, None], (colour + 0.5).clamp_(0, 255), torch.zeros((), device=device)).to(torch.uint8)
    if flip_h is not None:
        img = torch.where(flip_h.to(device)[:, None, None, None], img.flip(-1), img)
    if flip_v is not None:
        img = torch.where(flip_v.to(device)[:, None, None, None], img.flip(-2), img)
    return img


def _segment_coverage(px, py, ax, ay, dx, dy, half, strength, antialias: bool):
    """Coverage of pixel centres (px, py) by the stroke of segments (ax, ay) + t (dx, dy), t in [0, 1]:
    ``draw.stroke_polylines``'s rule."""
    len2 = dx * dx + dy * dy
    inv = torch.where(len2 > 0, 1.0 / len2.clamp(min=1e-30), torch.zeros((), device=px.device))
    ex, ey = px - ax, py - ay
    t = ((ex * dx + ey * dy) * inv).clamp(0.0, 1.0)
    ex, ey = ex - t * dx, ey - t * dy
    d2 = ex * ex + ey * ey
    if antialias:
        return (half + 0.5 - d2.sqrt()).clamp(0.0, 1.0) * strength
    return (d2 <= half * half).to(px.dtype)


def stroke_closed_polylines(xs: torch.Tensor, ys: torch.Tensor, counts: torch.Tensor, widths: torch.Tensor,
                            colors: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Draw closed polylines, in order, each over the ones before: uint8 (B, 3, size, size).

    Args:
        xs, ys: (B, P, V) float vertex coordinates in pixels (x right, y down, pixel (i, j) centred
            at (j, i)); polyline p of image b has its first ``counts[b, p]`` vertices, the rest padding.
        counts: (B, P) int64 vertex counts; 0 = no polyline there (images with fewer polylines).
        widths: (B, P) stroke widths in pixels; colors: (B, P, 3) in 0..255.
        antialias: coverage from the distance to the polyline (``draw.stroke_polylines``'s rule).
    """
    b, num, v = xs.shape
    device = xs.device
    img = torch.zeros(b, 3, size * size, device=device)
    idx = torch.arange(v, device=device)
    half_all = 0.5 * widths.clamp(min=1.0)
    reach_max = float((half_all + (0.5 if antialias else 0.0)).max()) if widths.numel() else 0.0
    # A pixel within `reach` of a segment is within r = reach + spacing / 2 of one of its samples: along
    # each axis one of the floor(2 r) + 1 pixel centres from ceil(sample - r) on.
    radius = reach_max + 0.5 * SAMPLE_SPACING_PX
    off = torch.arange(int(math.floor(2 * radius)) + 1, device=device)
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    oy, ox = oy.reshape(-1), ox.reshape(-1)
    for p in range(num):
        n = counts[:, p].to(device)  # (B,)
        nxt = torch.where(idx[None] + 1 < n[:, None], idx[None] + 1, torch.zeros((), dtype=idx.dtype, device=device))
        seg_ok = (idx[None] < n[:, None]) & (n[:, None] > 1)  # (B, V): segment i joins vertex i to i + 1 (mod n)
        ax, ay = xs[:, p], ys[:, p]
        dx, dy = ax.gather(1, nxt) - ax, ay.gather(1, nxt) - ay
        length = (dx * dx + dy * dy).sqrt()
        samples = torch.where(seg_ok, (length / SAMPLE_SPACING_PX).ceil().long() + 1, torch.zeros((), dtype=torch.long,
                                                                                                  device=device))
        flat = samples.reshape(-1)
        total = int(flat.sum())
        if total == 0:
            continue
        seg = torch.repeat_interleave(torch.arange(flat.numel(), device=device), flat)  # (S,) flat segment index
        first = torch.cumsum(flat, 0) - flat
        t = (torch.arange(total, device=device) - first[seg]).float() / (flat[seg] - 1).clamp(min=1).float()
        sax, say = ax.reshape(-1)[seg], ay.reshape(-1)[seg]
        sdx, sdy = dx.reshape(-1)[seg], dy.reshape(-1)[seg]
        img_of = seg // v
        w = widths[:, p].to(device)[img_of]
        half, strength = 0.5 * w.clamp(min=1.0), (w.clamp(max=1.0) if antialias else torch.ones_like(w))
        cx, cy = (sax + t * sdx - radius).ceil().long(), (say + t * sdy - radius).ceil().long()
        px, py = cx[:, None] + ox[None], cy[:, None] + oy[None]  # (S, stencil)
        cov = _segment_coverage(px.float(), py.float(), sax[:, None], say[:, None], sdx[:, None], sdy[:, None],
                                half[:, None], strength[:, None], antialias)
        inside = (px >= 0) & (px < size) & (py >= 0) & (py < size) & (cov > 0)
        where = (img_of[:, None] * size * size + py.clamp(0, size - 1) * size + px.clamp(0, size - 1))[inside]
        layer = torch.zeros(b * size * size, device=device)
        layer.scatter_reduce_(0, where, cov[inside], reduce="amax")  # the polyline's coverage: max over its segments
        layer = layer.view(b, 1, size * size)
        img = img * (1.0 - layer) + colors[:, p].to(device=device, dtype=torch.float32)[:, :, None] * layer
    return (img + 0.5).clamp_(0, 255).to(torch.uint8).view(b, 3, size, size)


def _bounds(values: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) min and max of ``values`` (B, M) over the alive points."""
    inf = torch.full((), math.inf, device=values.device)
    return torch.where(alive, values, inf).amin(1), torch.where(alive, values, -inf).amax(1)


def _pixel(coord: torch.Tensor, alive: torch.Tensor, size: int) -> torch.Tensor:
    """int64 pixel index of non-negative float coordinates, truncated as ``int()`` and kept in the image."""
    coord = torch.where(alive, torch.nan_to_num(coord, nan=0.0, posinf=0.0, neginf=0.0), torch.zeros((), device=coord.device))
    return coord.clamp(0, size - 1).to(torch.int64)


def project_2d(points: torch.Tensor, alive: torch.Tensor, size: int, margin_px: int):
    """Rows and columns of 2-D points (B, 2, M), each axis scaled to [margin, size - margin] (y up),
    a flat axis in the middle: ``fractal._axis_scale``'s framing."""
    x, y = points[:, 0], points[:, 1]
    (x0, x1), (y0, y1) = _bounds(x, alive), _bounds(y, alive)
    span = float(size - 2 * margin_px)
    zero = torch.zeros((), device=x.device)
    sx = torch.where(x1 > x0, span / (x1 - x0).clamp(min=1e-30), zero)[:, None]
    sy = torch.where(y1 > y0, span / (y1 - y0).clamp(min=1e-30), zero)[:, None]
    ox = torch.where(x1 > x0, float(margin_px), size / 2)[:, None]
    oy = torch.where(y1 > y0, float(margin_px), size / 2)[:, None]
    cols = _pixel(ox + (x - x0[:, None]) * sx, alive, size)
    rows = _pixel(oy + (y1[:, None] - y) * sy, alive, size)
    return rows, cols


def project_3d(points: torch.Tensor, alive: torch.Tensor, rot: torch.Tensor, size: int, margin_px: int,
               camera_distance: float | None):
    """Rows, columns and depth in [0, 1] (1 = nearest) of 3-D points (B, 3, M) seen through ``rot``
    (B, 3, 3), orthographic or (``camera_distance`` in object sizes) perspective, framed to fill the
    image less the margin keeping the aspect ratio: ``exfractal._project``'s camera."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    r = rot.to(device=points.device, dtype=torch.float32)[:, :, :, None]  # (B, 3, 3, 1)
    u = r[:, 0, 0] * x + r[:, 0, 1] * y + r[:, 0, 2] * z
    v = r[:, 1, 0] * x + r[:, 1, 1] * y + r[:, 1, 2] * z
    w = r[:, 2, 0] * x + r[:, 2, 1] * y + r[:, 2, 2] * z
    (u0, u1), (v0, v1), (w0, w1) = _bounds(u, alive), _bounds(v, alive), _bounds(w, alive)
    if camera_distance is not None:
        cu, cv, cw = [(0.5 * (a + b))[:, None] for a, b in ((u0, u1), (v0, v1), (w0, w1))]
        cam = (camera_distance * torch.stack([u1 - u0, v1 - v0, w1 - w0], 1).amax(1).clamp(min=1e-30))[:, None]
        f = cam / (cam - (w - cw))
        u, v = cu + (u - cu) * f, cv + (v - cv) * f
        (u0, u1), (v0, v1) = _bounds(u, alive), _bounds(v, alive)
    span = torch.maximum(u1 - u0, v1 - v0)
    zero = torch.zeros((), device=x.device)
    scale = torch.where(span > 0, (size - 2 * margin_px) / span.clamp(min=1e-30), zero)[:, None]
    depth = torch.where((w1 > w0)[:, None], (w - w0[:, None]) / (w1 - w0).clamp(min=1e-30)[:, None],
                        torch.ones((), device=x.device))
    cols = _pixel(0.5 * size + (u - (0.5 * (u0 + u1))[:, None]) * scale, alive, size)
    rows = _pixel(0.5 * size - (v - (0.5 * (v0 + v1))[:, None]) * scale, alive, size)
    return rows, cols, depth


def render_ifs(params: list[dict], cdfs: list, num_points: int, burn_in: int, size: int, margin_px: int, color: bool,
               device: torch.device, rotations=None, camera_distance: float | None = None,
               shade_min: float = 1.0) -> torch.Tensor:
    """FractalDB (2-D, ``rotations`` None) or ExFractalDB (3-D) images of ``params()`` dicts on
    ``device``: uint8 (B, 3, size, size).

    Args:
        params: one ``Fractal.params`` / ``ExFractal.params`` dict per image.
        cdfs: their map choice's cumulative probabilities (``fractal.cdf_of``), (N,) float64 each.
        num_points, burn_in: the CPU renderer's points per image and skipped start.
        size, margin_px, color: the generator's image side, margin and colour switch.
        rotations: (B, 3, 3) views of 3-D images; ``camera_distance`` for perspective; ``shade_min``
            the brightness of the farthest point.
    """
    if num_points > 1 << 20:
        raise ValueError(f"num_points={num_points}: device rendering keys points by a 20-bit index; use at most "
                         f"{1 << 20} or data.render=workers")
    b = len(params)
    n = max(len(p["maps"]) for p in params)
    width = len(params[0]["maps"][0])
    maps = torch.zeros(b, n, width, dtype=torch.float64)
    cdf = torch.full((b, n), 2.0, dtype=torch.float64)  # padding is never chosen: u < 1 < 2
    palette = torch.ones(b, n, 3, dtype=torch.float64)
    patch = max(len(p["patch"]) for p in params)
    patches = torch.zeros(b, patch, patch, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(params, cdfs)):
        k = len(p["maps"])
        maps[i, :k] = torch.tensor(p["maps"], dtype=torch.float64)
        cdf[i, :k] = torch.as_tensor(c, dtype=torch.float64)
        if color:
            palette[i, :k] = torch.tensor(p["palette"], dtype=torch.float64)
        patches[i] = torch.tensor(p["patch"], dtype=torch.bool)
    seeds = torch.tensor([int(p["chaos_seed"]) for p in params], dtype=torch.int64)
    f32 = dict(device=device, dtype=torch.float32)
    points, rgb, index = chaos_game(maps.to(**f32), cdf.to(device), palette.to(**f32), seeds, num_points, burn_in)
    drawn = index >= 0
    if rotations is None:
        rows, cols = project_2d(points, drawn, size, margin_px)
        flips = torch.tensor([[p["flip_h"], p["flip_v"]] for p in params], dtype=torch.bool, device=device)
        return splat_points(rows, cols, rgb, index, size, patches=patches.to(device), flip_h=flips[:, 0],
                            flip_v=flips[:, 1])
    rows, cols, depth = project_3d(points, drawn, torch.as_tensor(rotations), size, margin_px, camera_distance)
    return splat_points(rows, cols, rgb, index, size, depth=depth, shade_min=shade_min, patches=patches.to(device))


def stroke_batch(polylines: list[tuple], size: int, antialias: bool, device: torch.device) -> torch.Tensor:
    """``stroke_closed_polylines`` of per-image numpy polylines: one ``(xs (P, V), ys (P, V), widths (P,),
    colors (P, 3))`` tuple per image, padded here to the batch's largest P and V."""
    b = len(polylines)
    num = max(xs.shape[0] for xs, *_ in polylines)
    v = max(xs.shape[1] for xs, *_ in polylines)
    xs, ys = torch.zeros(b, num, v, dtype=torch.float64), torch.zeros(b, num, v, dtype=torch.float64)
    counts, widths = torch.zeros(b, num, dtype=torch.int64), torch.zeros(b, num, dtype=torch.float64)
    colors = torch.zeros(b, num, 3, dtype=torch.float64)
    for i, (x, y, w, c) in enumerate(polylines):
        k, m = x.shape
        xs[i, :k, :m], ys[i, :k, :m] = torch.from_numpy(x), torch.from_numpy(y)
        counts[i, :k], widths[i, :k], colors[i, :k] = m, torch.from_numpy(w), torch.from_numpy(c)
    f32 = dict(device=device, dtype=torch.float32)
    return stroke_closed_polylines(xs.to(**f32), ys.to(**f32), counts.to(device), widths.to(**f32),
                                   colors.to(**f32), size, antialias)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # Perlin's quintic, as perlin._fade


def perlin_fields(perm: torch.Tensor, grad: torch.Tensor, frame: torch.Tensor, freqs: torch.Tensor,
                  amps: torch.Tensor, offsets: torch.Tensor, mode: torch.Tensor, lut: torch.Tensor,
                  size: int) -> torch.Tensor:
    """``perlin._render_kernel`` for a batch: uint8 (B, 3, size, size).

    Args:
        perm: (B, 512) int64 permutations (twice), grad: (B, 256, 2) gradients (``perlin.noise_tables``).
        frame: (B, 2, 2) image -> noise coordinates; freqs, amps: (B, O) (padding octaves: amplitude 0);
        offsets: (B, O, 2); mode: (B,) int64 index into ``perlin.MODES``; lut: (B, 256, 3) uint8.
    """
    b, octaves = freqs.shape
    device = perm.device
    c = (torch.arange(size, device=device, dtype=torch.float64) + 0.5) / size - 0.5
    y, x = c[None, :, None], c[None, None, :]  # rows, columns
    u = frame[:, 0, 0, None, None] * x + frame[:, 0, 1, None, None] * y  # (B, H, W)
    v = frame[:, 1, 0, None, None] * x + frame[:, 1, 1, None, None] * y
    field = torch.zeros(b, size, size, dtype=torch.float64, device=device)
    flat_perm = perm.reshape(b, -1)

    def hashed(i: torch.Tensor) -> torch.Tensor:  # perm[i] per image, i (B, H, W)
        return flat_perm.gather(1, i.reshape(b, -1)).view_as(i)

    def ramp(h: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        g = grad.gather(1, h.reshape(b, -1, 1).expand(-1, -1, 2)).view(*h.shape, 2)
        return g[..., 0] * dx + g[..., 1] * dy

    for o in range(octaves):
        px = u * freqs[:, o, None, None] + offsets[:, o, 0, None, None]
        py = v * freqs[:, o, None, None] + offsets[:, o, 1, None, None]
        fx, fy = px.floor(), py.floor()
        xi, yi = fx.long() & 255, fy.long() & 255
        tx, ty = px - fx, py - fy
        a0, a1 = hashed(xi), hashed(xi + 1)
        n00, n10 = ramp(hashed(a0 + yi), tx, ty), ramp(hashed(a1 + yi), tx - 1.0, ty)
        n01, n11 = ramp(hashed(a0 + yi + 1), tx, ty - 1.0), ramp(hashed(a1 + yi + 1), tx - 1.0, ty - 1.0)
        fu, fv = _fade(tx), _fade(ty)
        nx0, nx1 = n00 + fu * (n10 - n00), n01 + fu * (n11 - n01)
        n = nx0 + fv * (nx1 - nx0)
        m = mode[:, None, None]
        n = torch.where(m == 1, n.abs(), torch.where(m == 2, (1.0 - n.abs()) ** 2, n))
        field = field + amps[:, o, None, None] * n
    lo, hi = field.amin((1, 2), keepdim=True), field.amax((1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1e-300), torch.zeros((), dtype=field.dtype, device=device))
    k = ((field - lo) * scale + 0.5).long().clamp_(0, 255)  # (B, H, W)
    out = lut.gather(1, k.reshape(b, -1, 1).expand(-1, -1, 3))  # (B, H*W, 3)
    return out.view(b, size, size, 3).permute(0, 3, 1, 2).contiguous()
