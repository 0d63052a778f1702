"""Registry of formula-driven image generators.

Contract shared by every generator: an image is a pure function of
(generator, category parameters, label, instance, seed). The same call returns the
same bytes on any machine and in any worker, so data can be generated on the fly by
any number of ranks, or written to shards and regenerated bit for bit.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from vitscale.registry import Registry

__all__ = ["Generator", "register_generator", "create_generator", "list_generators"]


class Generator(Protocol):
    num_classes: int
    image_size: int
    seed: int

    def render(self, label: int, instance: int) -> np.ndarray:
        """Return image ``instance`` of class ``label`` as a (H, W, 3) uint8 array."""

    def params(self, label: int, instance: int) -> dict:
        """The parameters image ``instance`` of class ``label`` is drawn from (category
        parameters and the instance's own draws), JSON-serialisable: written beside each
        image in the shards (``{key}.json``)."""


# Generators whose categories come from a search (FractalDB) also offer
#   categories() -> list            one JSON-serialisable entry per class
# and accept ``categories=`` (that list) in their constructor to skip the search, so a
# category set is found once, saved, and reused (``vitscale-synth search``).


GENERATORS: Registry[Generator] = Registry("synthetic generator", "vitscale.data.synthetic.list_generators()")


def register_generator(name: str):
    """Class decorator: ``@register_generator("gratings")``."""
    return GENERATORS.register(name)


def list_generators() -> list[str]:
    return GENERATORS.names()


def create_generator(name: str, num_classes: int, image_size: int, seed: int, **params) -> Generator:
    """Build a registered generator.

    Args:
        name: registered name (``list_generators()``).
        num_classes: number of categories.
        image_size: output side length in pixels.
        seed: dataset seed; every image depends on it.
        params: generator-specific parameters.
    """
    return GENERATORS.build(name, num_classes=num_classes, image_size=image_size, seed=seed, **params)


def instance_rng(seed: int, label: int, instance: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one image: independent of call order, worker and machine."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, label, instance]))


from vitscale.data.synthetic import gratings  # noqa: E402,F401  (registers its generator)
from vitscale.data.synthetic import perlin  # noqa: E402,F401
from vitscale.data.synthetic import dead_leaves  # noqa: E402,F401
from vitscale.data.synthetic import fractal, exfractal  # noqa: E402,F401
from vitscale.data.synthetic import rcdb, visual_atom, bezier  # noqa: E402,F401
