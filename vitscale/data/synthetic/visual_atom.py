"""VisualAtom (Takashima et al., CVPR 2023, "Visual Atoms: Pre-training Vision
Transformers with Sinusoidal Waves").

An image is a stack of closed orbits whose radius is the sum of two sinusoidal waves,

    r_k(theta) = r0_k + a1 sin(n1 theta + phi1) + a2 sin(n2 theta + phi2),

drawn for k = 0 .. orbits - 1 at growing base radius r0_k, each orbit with a little noise
of its own (radius and amplitude jitter), on black. The paper draws about 200 orbits
and takes the orbit frequencies n1, n2 from 0..20 (the defaults here).

Category (class) = the frequency pair (n1, n2) with n1 < n2 (swapping them gives the same
family of shapes; n1 = n2 would duplicate (0, n2)), plus, when num_classes exceeds the
number of pairs P, an amplitude level: the amplitude range splits into
L = ceil(num_classes / P) bands, and a class draws a1 and a2 from its band. Which
(pair, level) combinations are used, and in which class order, is a permutation of all
P * L combinations fixed by the seed, so every class is a distinct combination.

Instance = the amplitudes within the class band, the phases phi1, phi2, the radius of
the first and last orbit, the per-orbit noise, the centre, the line width and the two
colours the orbits fade between.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.device import stroke_batch
from vitscale.data.synthetic.draw import stroke_polylines

__all__ = ["VisualAtom"]

# Vertex buffers, one pair per thread, reused from image to image: NumPy's (orbits, points)
# temporaries of 320 kB each cost about 80 page faults apiece per image.
_scratch = threading.local()


@njit(cache=True)
def _orbit_vertices(base_radii, amplitudes, w1, w2, cos_t, sin_t, cx, cy, xs, ys):
    """Orbit k's vertex i at ``(cx + r cos_t[i], cy + r sin_t[i])``, ``r = base_radii[k] +
    amplitudes[k, 0] w1[i] + amplitudes[k, 1] w2[i]``, into ``xs``, ``ys`` (orbit-major): the
    NumPy expression's operations in its order, without its temporaries."""
    m = w1.shape[0]
    for k in range(base_radii.shape[0]):
        b, a1, a2 = base_radii[k], amplitudes[k, 0], amplitudes[k, 1]
        for i in range(m):
            r = b + a1 * w1[i] + a2 * w2[i]
            xs[k * m + i] = cx + r * cos_t[i]
            ys[k * m + i] = cy + r * sin_t[i]


@register_generator("visual_atom")
class VisualAtom:
    """Two-sine-wave orbits; see the module docstring for what a category is.

    Args:
        num_classes: number of categories.
        image_size: output side in pixels.
        seed: dataset seed.
        frequencies: (min, max) orbit frequencies n1, n2, inclusive.
        amplitude: (min, max) wave amplitudes a1, a2 as a fraction of the image size;
            split into the classes' amplitude bands.
        orbits: orbits per image.
        points_per_orbit: samples of theta per orbit (the contour's quantisation); 200
            still samples the fastest default wave (n = 20) 10 times per period, and
            the drawing cost grows with it.
        orbit_noise: relative jitter of each orbit's amplitudes, and of its base radius
            in units of the radius step.
        line_width: (min, max) line width in pixels at 224 px (scaled with image_size).
        center_jitter: the centre moves up to this fraction of the image size.
        antialias: anti-aliased lines.
    """

    def __init__(self, num_classes: int, image_size: int, seed: int, frequencies: tuple[int, int] = (0, 20),
                 amplitude: tuple[float, float] = (0.02, 0.12), orbits: int = 200, points_per_orbit: int = 200,
                 orbit_noise: float = 0.05, line_width: tuple[float, float] = (0.3, 1.0),
                 center_jitter: float = 0.05, antialias: bool = True):
        if num_classes < 1 or image_size < 8:
            raise ValueError(f"visual_atom needs num_classes >= 1 and image_size >= 8, got {num_classes}, {image_size}")
        f0, f1 = frequencies
        if int(f0) != f0 or int(f1) != f1 or not 0 <= f0 < f1:
            raise ValueError(f"visual_atom frequencies={frequencies} must be integers 0 <= min < max "
                             "(two distinct frequencies per class), e.g. (0, 20)")
        a0, a1 = amplitude
        if not 0.0 < a0 <= a1 or 2 * a1 >= 0.45:
            raise ValueError(f"visual_atom amplitude={amplitude} must satisfy 0 < min <= max < 0.225 "
                             "so that two waves fit inside the image")
        if orbits < 1 or points_per_orbit < 3:
            raise ValueError(f"visual_atom needs orbits >= 1 and points_per_orbit >= 3, got {orbits}, "
                             f"{points_per_orbit}")
        lw0, lw1 = line_width
        if not 0.0 < lw0 <= lw1:
            raise ValueError(f"visual_atom line_width={line_width} must be 0 < min <= max")
        if not 0.0 <= orbit_noise < 1.0 or not 0.0 <= center_jitter < 0.45 - 2 * a1:
            raise ValueError(f"visual_atom needs 0 <= orbit_noise < 1 and 0 <= center_jitter < 0.45 - 2 * max "
                             f"amplitude = {0.45 - 2 * a1:.3f} (room for the orbits), "
                             f"got {orbit_noise}, {center_jitter}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.frequencies, self.amplitude = (int(f0), int(f1)), (float(a0), float(a1))
        self.orbits, self.points_per_orbit, self.orbit_noise = int(orbits), int(points_per_orbit), float(orbit_noise)
        self.line_width, self.center_jitter, self.antialias = (float(lw0), float(lw1)), float(center_jitter), antialias

        pairs = [(n1, n2) for n1 in range(self.frequencies[0], self.frequencies[1] + 1)
                 for n2 in range(n1 + 1, self.frequencies[1] + 1)]
        self.amplitude_levels = -(-num_classes // len(pairs))
        # A permutation of all (pair, level) combinations, fixed by the seed alone.
        combos = instance_rng(seed, 0, 0, stream=2).permutation(len(pairs) * self.amplitude_levels)[:num_classes]
        self.categories = [(*pairs[c % len(pairs)], int(c // len(pairs))) for c in combos]

    def category(self, label: int) -> dict:
        """Category ``label``: frequencies n1 < n2 and its amplitude band (fractions of the image size)."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"visual_atom label {label} outside [0, {self.num_classes}); "
                             "use a label below num_classes")
        n1, n2, level = self.categories[label]
        a0, a1 = self.amplitude
        band = (a1 - a0) / self.amplitude_levels
        return {"n1": n1, "n2": n2, "amplitude_band": [a0 + level * band, a0 + (level + 1) * band]}

    def _draws(self, label: int, instance: int) -> dict:
        cat = self.category(label)
        rng = instance_rng(self.seed, label, instance)
        s, k = self.image_size, self.orbits
        amps = rng.uniform(*cat["amplitude_band"], size=2) * s
        center = (s - 1) / 2 + rng.uniform(-self.center_jitter, self.center_jitter, size=2) * s
        # The outermost orbit reaches r_last + a1 + a2: keep it inside the image.
        r_first = rng.uniform(0.02, 0.1) * s
        r_last = max(r_first, rng.uniform(0.75, 1.0) * ((0.5 - self.center_jitter) * s - amps.sum()))
        step = (r_last - r_first) / max(k - 1, 1)
        c0, c1 = rng.uniform(0.15, 1.0, size=3), rng.uniform(0.15, 1.0, size=3)
        fade = np.linspace(0.0, 1.0, k)[:, None]
        return {**cat, "amplitudes": amps, "phases": rng.uniform(0.0, 2 * np.pi, size=2), "center": center,
                "base_radii": r_first + step * (np.arange(k) + self.orbit_noise * rng.uniform(-1.0, 1.0, size=k)),
                # (orbits, 2): each orbit's own a1, a2.
                "orbit_amplitudes": amps * (1.0 + self.orbit_noise * rng.uniform(-1.0, 1.0, size=(k, 2))),
                "width": float(rng.uniform(*self.line_width) * s / 224.0),
                "colors": ((1.0 - fade) * c0 + fade * c1) * 255.0}

    def params(self, label: int, instance: int) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self._draws(label, instance).items()}

    def render(self, label: int, instance: int) -> np.ndarray:
        p = self._draws(label, instance)
        m, k = self.points_per_orbit, self.orbits
        bufs = getattr(_scratch, "xy", None)
        if bufs is None or bufs[0].shape[0] != k * m:
            bufs = _scratch.xy = (np.empty(k * m), np.empty(k * m))
        xs, ys = self._orbits(p, *bufs)
        img = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        stroke_polylines(img, xs, ys, np.arange(k + 1) * m, np.full(k, p["width"]), p["colors"],
                         closed=True, antialias=self.antialias)
        return img

    def _orbits(self, p: dict, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x and y (orbit after orbit, ``points_per_orbit`` each) of the orbits of ``_draws`` dict ``p``,
        written into ``xs`` and ``ys`` (orbits x points_per_orbit floats each)."""
        m = self.points_per_orbit
        theta = np.arange(m) * (2 * np.pi / m)
        w1 = np.sin(p["n1"] * theta + p["phases"][0])
        w2 = np.sin(p["n2"] * theta + p["phases"][1])
        _orbit_vertices(p["base_radii"], p["orbit_amplitudes"], w1, w2, np.cos(theta), np.sin(theta),
                        float(p["center"][0]), float(p["center"][1]), xs, ys)
        return xs, ys

    def render_batch(self, labels: torch.Tensor, instances: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images ``instances[i]`` of classes ``labels[i]`` stroked together on ``device``
        (``synthetic.device.stroke_closed_polylines``, the same orbits): uint8 (B, 3, H, W)."""
        draws = [self._draws(int(k), int(i)) for k, i in zip(labels.tolist(), instances.tolist())]
        k, m = self.orbits, self.points_per_orbit
        orbits = [self._orbits(p, np.empty(k * m), np.empty(k * m)) for p in draws]
        return stroke_batch([(xs.reshape(k, m), ys.reshape(k, m), np.full(k, p["width"]), p["colors"])
                             for (xs, ys), p in zip(orbits, draws)],
                            self.image_size, self.antialias, device)
