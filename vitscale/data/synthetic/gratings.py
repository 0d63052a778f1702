"""Oriented sinusoidal gratings: the smallest learnable formula-driven task.

Class k is the orientation ``pi * k / num_classes`` (jittered by a quarter of the
spacing between classes); frequency, phase, a dark and a bright colour and pixel noise
vary per instance. A tiny ViT separates the classes within a few hundred steps, which makes it
the default data for smoke runs and tests. The FDSL generators (FractalDB, RCDB, ...)
register beside it.
"""
from __future__ import annotations

import numpy as np

from vitscale.data.synthetic import instance_rng, register_generator


@register_generator("gratings")
class Gratings:
    def __init__(self, num_classes: int, image_size: int, seed: int,
                 min_cycles: float = 1.5, max_cycles: float = 5.0, noise: float = 0.08):
        if num_classes < 1 or image_size < 4:
            raise ValueError(f"gratings needs num_classes >= 1 and image_size >= 4, got {num_classes}, {image_size}")
        self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
        self.min_cycles, self.max_cycles, self.noise = min_cycles, max_cycles, noise
        coords = (np.arange(image_size, dtype=np.float64) + 0.5) / image_size
        self._y, self._x = np.meshgrid(coords, coords, indexing="ij")

    def params(self, label: int, instance: int) -> dict:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        rng = instance_rng(self.seed, label, instance)
        spacing = np.pi / self.num_classes
        # A dark and a bright colour: with two free colours many instances have no contrast
        # left, and a tiny ViT then stays at chance for hundreds of steps.
        return {"theta": label * spacing + rng.uniform(-0.25, 0.25) * spacing,
                "cycles": rng.uniform(self.min_cycles, self.max_cycles), "phase": rng.uniform(0, 2 * np.pi),
                "dark": rng.uniform(0.0, 0.3, size=3).tolist(), "bright": (1.0 - rng.uniform(0.0, 0.3, size=3)).tolist(),
                "noise_seed": int(rng.integers(2**31))}

    def render(self, label: int, instance: int) -> np.ndarray:
        p = self.params(label, instance)
        c0, c1, theta = np.array(p["dark"]), np.array(p["bright"]), p["theta"]
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * p["cycles"] * (self._x * np.cos(theta) + self._y * np.sin(theta))
                                  + p["phase"])
        img = c0 + (c1 - c0) * wave[..., None]  # (H, W, 3) in [0, 1]
        img += np.random.default_rng(p["noise_seed"]).normal(0.0, self.noise, size=img.shape)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
