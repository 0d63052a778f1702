"""RCDB, the Radial Contour DataBase (Kataoka et al., CVPR 2022, "Replacing Labeled
Real-image Datasets with Auto-generated Contours").

An image is a set of concentric polygon outlines on black: one polygon, its vertex radii
perturbed by 1-D Perlin noise, drawn again and again at growing radius (the "rings"),
each ring with its own line width and grey level, around a jittered centre. The paper
found contours alone enough to pre-train ViTs; its best setting spans polygons of 3 to
102 vertices (``vertices=(3, 102)``, the default here).

Category (class) = (number of polygon vertices, noise level, noise frequency). Classes
walk the vertex range first and the noise levels second, deterministically from the
class index: with ``num_classes <= V`` (V vertex counts) the classes spread evenly over
the range, both ends included, at one noise level; beyond that, class k has
``vertices[0] + k % V`` vertices and noise level ``k // V`` of ``ceil(num_classes / V)``
levels that split ``noise_amplitude``. The noise frequency (Perlin lattice cells around
the contour) is drawn per class from the seed.

Instance = the noise itself (Perlin gradients, phase and drift from ring to ring), the
polygon's rotation, centre, number of rings and their radii, line widths and grey
levels (or colours with ``color=True``).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from vitscale.data.synthetic import instance_rng, register_generator
from vitscale.data.synthetic.device import stroke_batch
from vitscale.data.synthetic.draw import stroke_polylines

__all__ = ["RCDB", "perlin_1d"]


@njit(cache=True)
def perlin_1d(x: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """Periodic 1-D Perlin (gradient) noise in [-1, 1].

    Args:
        x: (N,) positions in lattice cells.
        gradients: (P,) gradient at each lattice point, in [-1, 1]; the noise repeats
            every P cells, so a contour sampled over x in [0, P) closes smoothly.

    Returns:
        (N,) noise values; 0 at lattice points.
    """
    period = gradients.shape[0]
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        cell = np.floor(x[i])
        t = x[i] - cell
        i0 = int(cell) % period
        i1 = (i0 + 1) % period
        fade = t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # Perlin's quintic: C2 at lattice points
        # The two gradient ramps meet at most 0.5 high (t = 0.5): x2 maps to [-1, 1].
        out[i] = 2.0 * ((1.0 - fade) * gradients[i0] * t + fade * gradients[i1] * (t - 1.0))
    return out


def _check_range(name: str, value, low: float, integer: bool = False) -> tuple:
    lo, hi = value
    if integer and (int(lo) != lo or int(hi) != hi):
        raise ValueError(f"rcdb {name}={value} must be a pair of integers")
    if not low <= lo <= hi:
        raise ValueError(f"rcdb {name}={value} must be a pair (lo, hi) with {low} <= lo <= hi")
    return (int(lo), int(hi)) if integer else (float(lo), float(hi))


@register_generator("rcdb")
class RCDB:
    """Radial contours; see the module docstring for what a category is.

    Args:
        num_classes: number of categories.
        image_size: output side in pixels.
        seed: dataset seed.
        vertices: (min, max) polygon vertex counts, inclusive.
        noise_amplitude: (min, max) Perlin radius perturbation as a fraction of the ring
            radius; split into the noise levels.
        noise_cells: (min, max) Perlin lattice cells around the contour (noise
            frequency), drawn per category.
        rings: (min, max) number of contours per image.
        inner_radius, outer_radius: ranges of the first and last ring radius, as a
            fraction of the image size; the rings step evenly between them.
        line_width: (min, max) line width in pixels at 224 px (scaled with image_size).
        center_jitter: the centre moves up to this fraction of the image size.
        color: per-ring random RGB instead of grey levels.
        antialias: anti-aliased lines.
    """

    def __init__(self, num_classes: int, image_size: int, seed: int, vertices: tuple[int, int] = (3, 102),
                 noise_amplitude: tuple[float, float] = (0.05, 0.5), noise_cells: tuple[int, int] = (2, 6),
                 rings: tuple[int, int] = (10, 40), inner_radius: tuple[float, float] = (0.02, 0.1),
                 outer_radius: tuple[float, float] = (0.3, 0.45), line_width: tuple[float, float] = (0.5, 2.5),
                 center_jitter: float = 0.08, color: bool = False, antialias: bool = True):
        if num_classes < 1 or image_size < 8:
            raise ValueError(f"rcdb needs num_classes >= 1 and image_size >= 8, got {num_classes}, {image_size}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.vertices = _check_range("vertices", vertices, 3, integer=True)
        self.noise_amplitude = _check_range("noise_amplitude", noise_amplitude, 0.0)
        self.noise_cells = _check_range("noise_cells", noise_cells, 1, integer=True)
        self.rings = _check_range("rings", rings, 1, integer=True)
        self.inner_radius = _check_range("inner_radius", inner_radius, 0.0)
        self.outer_radius = _check_range("outer_radius", outer_radius, self.inner_radius[1])
        self.line_width = _check_range("line_width", line_width, 0.0)
        if not 0.0 <= center_jitter < 0.5:
            raise ValueError(f"rcdb center_jitter={center_jitter} must be in [0, 0.5)")
        self.center_jitter, self.color, self.antialias = float(center_jitter), bool(color), bool(antialias)

        lo, hi = self.vertices
        span = hi - lo + 1
        labels = np.arange(num_classes)
        if num_classes <= span:
            # Evenly over the range, both ends reached once num_classes >= 2.
            step = (span - 1) / max(num_classes - 1, 1)
            self.vertex_counts = lo + np.round(labels * step).astype(np.int64)
            levels, level = 1, np.zeros(num_classes, np.int64)
        else:
            self.vertex_counts = lo + labels % span
            levels, level = -(-num_classes // span), labels // span
        a0, a1 = self.noise_amplitude
        # Centre of each class's band of the amplitude range.
        self.noise_levels = a0 + (a1 - a0) * (level + 0.5) / levels
        self._noise_cells = np.array([int(instance_rng(seed, k, 0, stream=1).integers(
            self.noise_cells[0], self.noise_cells[1] + 1)) for k in range(num_classes)])

    def num_vertices(self, label: int) -> int:
        """Polygon vertex count of category ``label``."""
        self._check_label(label)
        return int(self.vertex_counts[label])

    def _check_label(self, label: int) -> None:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"rcdb label {label} outside [0, {self.num_classes}); use a label below num_classes")

    def _draws(self, label: int, instance: int) -> dict:
        self._check_label(label)
        rng = instance_rng(self.seed, label, instance)
        s = self.image_size
        n, cells = int(self.vertex_counts[label]), int(self._noise_cells[label])
        num_rings = int(rng.integers(self.rings[0], self.rings[1] + 1))
        center = (s - 1) / 2 + rng.uniform(-self.center_jitter, self.center_jitter, size=2) * s
        r_in, r_out = rng.uniform(*self.inner_radius) * s, rng.uniform(*self.outer_radius) * s
        if self.color:
            colors = rng.uniform(0.2, 1.0, size=(num_rings, 3))
        else:
            colors = np.repeat(rng.uniform(0.2, 1.0, size=(num_rings, 1)), 3, axis=1)
        return {"num_vertices": n, "noise_amplitude": float(self.noise_levels[label]), "noise_cells": cells,
                "gradients": rng.uniform(-1.0, 1.0, size=cells),
                "noise_phase": float(rng.uniform(0.0, cells)),
                # Lattice cells the noise moves per ring: neighbouring rings look alike.
                "noise_drift": float(rng.uniform(0.0, 0.3)),
                "rotation": float(rng.uniform(0.0, 2 * np.pi / n)),
                "center": center, "radii": np.linspace(r_in, r_out, num_rings),
                "widths": rng.uniform(*self.line_width, size=num_rings) * (s / 224.0),
                "colors": colors * 255.0}

    def params(self, label: int, instance: int) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self._draws(label, instance).items()}

    def _rings(self, p: dict) -> tuple[np.ndarray, np.ndarray]:
        """(rings, vertices) x and y of the contours of ``_draws`` dict ``p``."""
        n, radii = p["num_vertices"], p["radii"]
        j = np.arange(n)
        # (rings, n): noise position of vertex j on ring i, moving by `drift` per ring.
        pos = p["noise_phase"] + j * (p["noise_cells"] / n) + np.arange(len(radii))[:, None] * p["noise_drift"]
        noise = perlin_1d(pos.ravel(), p["gradients"]).reshape(pos.shape)
        r = radii[:, None] * (1.0 + p["noise_amplitude"] * noise)
        theta = p["rotation"] + 2 * np.pi * j / n
        return p["center"][0] + r * np.cos(theta), p["center"][1] + r * np.sin(theta)

    def render(self, label: int, instance: int) -> np.ndarray:
        p = self._draws(label, instance)
        xs, ys = self._rings(p)
        img = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        stroke_polylines(img, xs.ravel(), ys.ravel(), np.arange(len(p["radii"]) + 1) * p["num_vertices"],
                         p["widths"], p["colors"], closed=True, antialias=self.antialias)
        return img

    def render_batch(self, labels: torch.Tensor, instances: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images ``instances[i]`` of classes ``labels[i]`` stroked together on ``device``
        (``synthetic.device.stroke_closed_polylines``, the same contours): uint8 (B, 3, H, W)."""
        draws = [self._draws(int(k), int(i)) for k, i in zip(labels.tolist(), instances.tolist())]
        return stroke_batch([(*self._rings(p), p["widths"], p["colors"]) for p in draws], self.image_size,
                            self.antialias, device)
