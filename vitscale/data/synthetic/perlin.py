"""Perlin (gradient) noise textures: fractal Brownian motion over octaves, colour-mapped.

Perlin noise is the classic procedural texture; Kataoka et al. ("Pre-training without
Natural Images", ACCV 2020) pre-trained on Perlin-noise images as a formula-driven baseline
next to FractalDB. Here a class (category) is a deterministic parameter set drawn from the
class index and the dataset seed:

- base frequency (lattice cells across the image, log-uniform, i.e. the texture's scale),
- number of octaves and persistence (amplitude ratio between octaves; lacunarity, the
  frequency ratio, is a constructor argument, 2 by default),
- the octave combination: ``fbm`` (signed sum), ``turbulence`` (sum of ``|n|``, billowy) or
  ``ridged`` (sum of ``(1 - |n|)^2``, sharp crests),
- an orientation and an anisotropic stretch along it,
- a colour map: a dark-to-bright ramp of colour stops around a class hue.

An instance is a fresh noise field: its own permutation and gradient tables and octave
offsets, derived from ``noise_seed``, plus a small jitter of the class's frequency,
persistence, stretch and orientation. The noise field is normalised to its own min..max
before colour mapping, so every image spans the class's whole colour map.

The per-pixel work (noise over octaves, normalisation, colour lookup) is one numba kernel
using only IEEE arithmetic and ``floor`` (no transcendental functions, no fastmath), so
an image is the same bytes on every machine.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.device import perlin_fields

Mode = Literal["fbm", "turbulence", "ridged"]
MODES: tuple[str, ...] = ("fbm", "turbulence", "ridged")
_TABLE = 256  # lattice hash period (cells); offsets are drawn within it


@njit(cache=True)
def _fade(t: float) -> float:
    # Perlin's quintic 6t^5 - 15t^4 + 10t^3: C2-continuous, so no grid creases in the texture.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


@njit(cache=True)
def _noise(x: float, y: float, perm: np.ndarray, grad: np.ndarray) -> float:
    """2-D gradient noise at (x, y) in lattice units; 0 on lattice points, |n| <= sqrt(2)/2."""
    fx, fy = math.floor(x), math.floor(y)
    xi, yi = int(fx) & 255, int(fy) & 255
    x, y = x - fx, y - fy
    # perm holds the permutation twice (512 entries), so perm[xi + 1] + yi + 1 needs no wrap.
    h00, h10 = perm[perm[xi] + yi], perm[perm[xi + 1] + yi]
    h01, h11 = perm[perm[xi] + yi + 1], perm[perm[xi + 1] + yi + 1]
    n00 = grad[h00, 0] * x + grad[h00, 1] * y
    n10 = grad[h10, 0] * (x - 1.0) + grad[h10, 1] * y
    n01 = grad[h01, 0] * x + grad[h01, 1] * (y - 1.0)
    n11 = grad[h11, 0] * (x - 1.0) + grad[h11, 1] * (y - 1.0)
    u, v = _fade(x), _fade(y)
    nx0 = n00 + u * (n10 - n00)
    nx1 = n01 + u * (n11 - n01)
    return nx0 + v * (nx1 - nx0)


@njit(cache=True)
def _render_kernel(size: int, perm: np.ndarray, grad: np.ndarray, frame: np.ndarray, freqs: np.ndarray,
                   amps: np.ndarray, offsets: np.ndarray, mode: int, lut: np.ndarray) -> np.ndarray:
    """Fractal noise over octaves, min-max normalised, through a 256-entry colour lookup.

    frame: (2, 2) image -> noise coordinates (rotation and stretch); freqs, amps: (O,);
    offsets: (O, 2) lattice offsets per octave; mode: index into MODES; lut: (256, 3) uint8.
    Returns (size, size, 3) uint8.
    """
    field = np.empty((size, size), dtype=np.float64)
    lo, hi = np.inf, -np.inf
    for i in range(size):
        y = (i + 0.5) / size - 0.5  # pixel centres, image centred on 0 so rotation keeps it in place
        for j in range(size):
            x = (j + 0.5) / size - 0.5
            u = frame[0, 0] * x + frame[0, 1] * y
            v = frame[1, 0] * x + frame[1, 1] * y
            s = 0.0
            for o in range(freqs.shape[0]):
                n = _noise(u * freqs[o] + offsets[o, 0], v * freqs[o] + offsets[o, 1], perm, grad)
                if mode == 1:
                    n = abs(n)
                elif mode == 2:
                    n = 1.0 - abs(n)
                    n = n * n
                s += amps[o] * n
            field[i, j] = s
            lo = min(lo, s)
            hi = max(hi, s)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    img = np.empty((size, size, 3), dtype=np.uint8)
    for i in range(size):
        for j in range(size):
            k = int((field[i, j] - lo) * scale + 0.5)
            img[i, j, 0] = lut[k, 0]
            img[i, j, 1] = lut[k, 1]
            img[i, j, 2] = lut[k, 2]
    return img


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; (...,) x3 -> (..., 3). Arithmetic only (bit-stable)."""
    h6 = (np.asarray(h, dtype=np.float64) % 1.0) * 6.0
    s, v = np.asarray(s, dtype=np.float64), np.asarray(v, dtype=np.float64)
    sector = np.floor(h6)
    f = h6 - sector
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    sector = sector.astype(np.int64) % 6
    r = np.choose(sector, [v, q, p, p, t, v])
    g = np.choose(sector, [t, v, v, q, p, p])
    b = np.choose(sector, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def noise_tables(noise_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Permutation (512,) int64 (256 entries, twice) and unit gradients (256, 2) of one noise field.

    Gradients are uniform directions by rejection sampling in the unit disc, normalised with
    sqrt only, so the tables are bit-identical on every machine (no sin/cos).
    """
    rng = np.random.default_rng(noise_seed)
    perm = rng.permutation(_TABLE).astype(np.int64)
    grads = np.empty((0, 2))
    while len(grads) < _TABLE:
        g = rng.uniform(-1.0, 1.0, size=(2 * _TABLE, 2))
        r2 = (g * g).sum(axis=1)
        grads = np.concatenate([grads, g[(r2 > 1e-4) & (r2 <= 1.0)]])
    grads = grads[:_TABLE]
    grads /= np.sqrt((grads * grads).sum(axis=1, keepdims=True))
    return np.concatenate([perm, perm]), grads


def colour_lut(stops: list[list[float]]) -> np.ndarray:
    """(256, 3) uint8 lookup table interpolating linearly between evenly spaced colour stops."""
    stops_arr = np.asarray(stops, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(stops_arr))
    t = np.arange(256) / 255.0
    rgb = np.stack([np.interp(t, pos, stops_arr[:, c]) for c in range(3)], axis=1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def octave_arrays(p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frequencies (cells per image side), amplitudes (summing to 1) and the (2, 2) frame of params ``p``."""
    # Powers by repeated multiplication (cumprod), not np.power: SIMD builds of np.power may
    # round differently on different CPUs, and the image must be the same bytes everywhere.
    n = p["octaves"]
    freqs = p["frequency"] * np.cumprod(np.r_[1.0, np.full(n - 1, p["lacunarity"])])
    amps = np.cumprod(np.r_[1.0, np.full(n - 1, p["persistence"])])
    amps = amps / amps.sum()
    c, s = math.cos(p["orientation"]), math.sin(p["orientation"])
    # Dividing the coordinate along the orientation by the stretch elongates features along it.
    frame = np.array([[c / p["stretch"], s / p["stretch"]], [-s, c]])
    return freqs, amps, frame


def _check_range(name: str, value: tuple, lo: float, integer: bool = False) -> tuple:
    if (len(value) != 2 or not value[0] <= value[1] or value[0] < lo
            or (integer and any(int(v) != v for v in value))):
        kind = "integers" if integer else "numbers"
        raise ValueError(f"perlin {name}={value!r} must be two {kind} (low, high) with {lo} <= low <= high")
    return (int(value[0]), int(value[1])) if integer else (float(value[0]), float(value[1]))


@register_generator("perlin")
class Perlin:
    """Perlin-noise textures; see the module docstring for what a class and an instance are.

    Args:
        num_classes: number of categories.
        image_size: output side length in pixels.
        seed: dataset seed.
        frequency_range: base frequency, lattice cells across the image (log-uniform per class).
        octaves_range: number of octaves, inclusive integer range.
        persistence_range: amplitude ratio between successive octaves.
        lacunarity: frequency ratio between successive octaves (the same for all classes).
        stretch_range: anisotropic stretch along the class orientation (1 = isotropic).
        modes: octave combinations the classes choose from (``fbm``, ``turbulence``, ``ridged``).
        colour_stops: colour stops per class colour map.
        jitter: relative per-instance jitter of frequency, persistence and stretch (orientation:
            ``jitter * pi / 4`` radians); jittered values are clipped to their ranges.
    """

    def __init__(self, num_classes: int, image_size: int, seed: int,
                 frequency_range: tuple[float, float] = (1.5, 8.0), octaves_range: tuple[int, int] = (1, 5),
                 persistence_range: tuple[float, float] = (0.35, 0.75), lacunarity: float = 2.0,
                 stretch_range: tuple[float, float] = (1.0, 4.0), modes: tuple[Mode, ...] = MODES,
                 colour_stops: int = 4, jitter: float = 0.1):
        if num_classes < 1 or image_size < 4:
            raise ValueError(f"perlin needs num_classes >= 1 and image_size >= 4, got {num_classes}, {image_size}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.frequency_range = _check_range("frequency_range", tuple(frequency_range), 1e-3)
        self.octaves_range = _check_range("octaves_range", tuple(octaves_range), 1, integer=True)
        self.persistence_range = _check_range("persistence_range", tuple(persistence_range), 0.0)
        self.stretch_range = _check_range("stretch_range", tuple(stretch_range), 1.0)
        if not lacunarity > 1.0:
            raise ValueError(f"perlin lacunarity={lacunarity} must be > 1 (octaves get finer); 2.0 is classic")
        if not modes or any(m not in MODES for m in modes):
            raise ValueError(f"perlin modes={modes!r}: choose a non-empty subset of {MODES}")
        if colour_stops < 2:
            raise ValueError(f"perlin colour_stops={colour_stops} must be >= 2 (a colour map needs two ends)")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"perlin jitter={jitter} must be in [0, 1); 0 turns instance jitter off")
        self.lacunarity, self.modes = float(lacunarity), tuple(modes)
        self.colour_stops, self.jitter = int(colour_stops), float(jitter)

    def class_params(self, label: int) -> dict:
        """The parameters that define class ``label`` (the same for all its instances)."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"perlin label {label} outside [0, {self.num_classes}); num_classes={self.num_classes}")
        rng = instance_rng(self.seed, label, 0, stream=1)
        (f_lo, f_hi), (o_lo, o_hi) = self.frequency_range, self.octaves_range
        frequency = math.exp(rng.uniform(math.log(f_lo), math.log(f_hi)))
        octaves = int(rng.integers(o_lo, o_hi + 1))
        persistence = rng.uniform(*self.persistence_range)
        stretch = rng.uniform(*self.stretch_range)
        orientation = rng.uniform(0.0, math.pi)
        mode = self.modes[int(rng.integers(len(self.modes)))]
        # A dark-to-bright ramp (value rises along the stops) around a class hue: contrast is
        # guaranteed, and hue and saturation tell classes apart.
        hue, hue_spread = rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.5)
        n = self.colour_stops
        hues = hue + hue_spread * rng.uniform(-0.5, 0.5, size=n)
        sats = rng.uniform(0.2, 1.0, size=n)
        vals = np.linspace(rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0), n)
        stops = hsv_to_rgb(hues, sats, vals)
        return {"frequency": frequency, "octaves": octaves, "persistence": persistence,
                "lacunarity": self.lacunarity, "stretch": stretch, "orientation": orientation, "mode": mode,
                "colour_stops": stops.tolist()}

    def params(self, label: int, instance: int) -> dict:
        """Class parameters with this instance's jitter applied, plus its ``noise_seed`` and octave offsets."""
        if instance < 0:
            raise ValueError(f"perlin instance {instance} must be >= 0")
        p = self.class_params(label)
        rng = instance_rng(self.seed, label, instance)
        j = self.jitter
        p["frequency"] = float(np.clip(p["frequency"] * (1.0 + j * rng.uniform(-1, 1)), *self.frequency_range))
        p["persistence"] = float(np.clip(p["persistence"] * (1.0 + j * rng.uniform(-1, 1)), *self.persistence_range))
        p["stretch"] = float(np.clip(p["stretch"] * (1.0 + j * rng.uniform(-1, 1)), *self.stretch_range))
        p["orientation"] = float(p["orientation"] + j * (math.pi / 4) * rng.uniform(-1, 1))
        p["noise_seed"] = int(rng.integers(2**31))
        # Offsets move each octave to its own region of the lattice; otherwise all octaves would
        # vanish together at the image centre (noise is 0 on lattice points).
        p["offsets"] = rng.uniform(0.0, _TABLE, size=(p["octaves"], 2)).tolist()
        return p

    def render(self, label: int, instance: int) -> np.ndarray:
        p = self.params(label, instance)
        perm, grad = noise_tables(p["noise_seed"])
        freqs, amps, frame = octave_arrays(p)
        return _render_kernel(self.image_size, perm, grad, frame, freqs, amps, np.asarray(p["offsets"]),
                              MODES.index(p["mode"]), colour_lut(p["colour_stops"]))

    def render_batch(self, labels: torch.Tensor, instances: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images ``instances[i]`` of classes ``labels[i]`` computed together on ``device``
        (``synthetic.device.perlin_fields``, the same noise tables and octaves): uint8 (B, 3, H, W)."""
        ps = [self.params(int(k), int(i)) for k, i in zip(labels.tolist(), instances.tolist())]
        tables = [noise_tables(p["noise_seed"]) for p in ps]
        octaves = [octave_arrays(p) for p in ps]
        b, most = len(ps), max(p["octaves"] for p in ps)
        freqs, amps, offsets = np.zeros((b, most)), np.zeros((b, most)), np.zeros((b, most, 2))
        for i, (p, (f, a, _)) in enumerate(zip(ps, octaves)):
            freqs[i, :len(f)], amps[i, :len(a)], offsets[i, :len(f)] = f, a, p["offsets"]
        t = lambda a: torch.as_tensor(np.asarray(a), device=device)  # noqa: E731
        return perlin_fields(t(np.stack([q for q, _ in tables])).long(), t(np.stack([g for _, g in tables])),
                             t(np.stack([fr for _, _, fr in octaves])), t(freqs), t(amps), t(offsets),
                             t([MODES.index(p["mode"]) for p in ps]).long(),
                             t(np.stack([colour_lut(p["colour_stops"]) for p in ps])), self.image_size)
