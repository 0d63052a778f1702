"""Texture generators: ``perlin`` (fractal gradient noise) and ``dead_leaves`` (occluding shapes)."""
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic.dead_leaves import DeadLeaves, draw_leaves
from vitscale.data.synthetic.perlin import Perlin

ROOT = Path(__file__).resolve().parents[3]
NAMES = ["perlin", "dead_leaves"]
SIZE = 32


def _class_part(p: dict) -> dict:
    """The class-defining entries of params (instance draws and jitter removed)."""
    return {k: v for k, v in p.items() if k not in ("noise_seed", "offsets", "leaf_seed")}


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_determinism(name):
    gen = create_generator(name, num_classes=4, image_size=SIZE, seed=7)
    img = gen.render(2, 5)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert np.array_equal(img, gen.render(2, 5))
    assert np.array_equal(img, create_generator(name, num_classes=4, image_size=SIZE, seed=7).render(2, 5))
    # Nothing depends on call order: rendering other images in between changes nothing.
    gen.render(0, 0), gen.render(3, 9)
    assert np.array_equal(img, gen.render(2, 5))
    assert not np.array_equal(img, gen.render(2, 6)), "instances of one class must differ"
    assert not np.array_equal(img, create_generator(name, num_classes=4, image_size=SIZE, seed=8).render(2, 5))
    json.dumps(gen.params(2, 5))  # written beside each image in the shards


@pytest.mark.parametrize("name", NAMES)
def test_images_are_not_trivial(name):
    gen = create_generator(name, num_classes=6, image_size=SIZE, seed=0)
    for label in range(6):
        img = gen.render(label, 0)
        assert img.std() > 5.0, f"class {label} is nearly constant"
        assert len(np.unique(img.reshape(-1, 3), axis=0)) >= 8, f"class {label} has too few colours"


@pytest.mark.parametrize("name", NAMES)
def test_classes_differ(name):
    gen = create_generator(name, num_classes=8, image_size=SIZE, seed=1)
    parts = [json.dumps(_class_part(gen.params(label, 0)), sort_keys=True) for label in range(8)]
    assert len(set(parts)) == 8
    # Instances of one class share the class parameters (up to the perlin jitter).
    assert gen.params(3, 0)["alpha" if name == "dead_leaves" else "octaves"] == \
        gen.params(3, 1)["alpha" if name == "dead_leaves" else "octaves"]
    means = np.stack([np.mean([gen.render(label, i).astype(np.float64) for i in range(3)], axis=(0, 1, 2))
                      for label in range(8)])  # (classes, 3) mean colour per class
    dist = np.abs(means[:, None] - means[None]).max(-1)
    assert dist[~np.eye(8, dtype=bool)].min() > 1.0, "two classes have the same mean colour"


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_refused(name):
    gen = create_generator(name, num_classes=3, image_size=SIZE, seed=0)
    with pytest.raises(ValueError, match="label 3"):
        gen.render(3, 0)
    with pytest.raises(ValueError, match="instance"):
        gen.params(0, -1)
    with pytest.raises(ValueError, match="num_classes"):
        create_generator(name, num_classes=0, image_size=SIZE, seed=0)


def test_same_bytes_in_a_spawned_process():
    script = ("import hashlib; from vitscale.data.synthetic import create_generator\n"
              "for name in ('perlin', 'dead_leaves'):\n"
              f"    g = create_generator(name, num_classes=5, image_size={SIZE}, seed=11)\n"
              "    print(hashlib.sha256(b''.join(g.render(l, i).tobytes() for l in range(5) for i in range(2)))"
              ".hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    here = [hashlib.sha256(b"".join(create_generator(name, num_classes=5, image_size=SIZE, seed=11)
                                    .render(label, i).tobytes() for label in range(5) for i in range(2))).hexdigest()
            for name in NAMES]
    assert out.stdout.split() == here


# --- perlin ---


def test_perlin_parameters_within_configured_ranges():
    for kwargs in ({}, {"frequency_range": (3.0, 5.0), "octaves_range": (2, 3), "persistence_range": (0.4, 0.5),
                        "stretch_range": (1.0, 1.5), "jitter": 0.3}):
        gen = Perlin(num_classes=200, image_size=SIZE, seed=3, **kwargs)
        f_lo, f_hi = gen.frequency_range
        seen_octaves = set()
        for label in range(200):
            p = gen.params(label, label % 7)
            assert f_lo <= p["frequency"] <= f_hi
            assert gen.octaves_range[0] <= p["octaves"] <= gen.octaves_range[1]
            assert gen.persistence_range[0] <= p["persistence"] <= gen.persistence_range[1]
            assert gen.stretch_range[0] <= p["stretch"] <= gen.stretch_range[1]
            assert len(p["offsets"]) == p["octaves"]
            seen_octaves.add(p["octaves"])
        assert seen_octaves == set(range(gen.octaves_range[0], gen.octaves_range[1] + 1))
    with pytest.raises(ValueError, match="octaves_range"):
        Perlin(num_classes=2, image_size=SIZE, seed=0, octaves_range=(0, 3))
    with pytest.raises(ValueError, match="modes"):
        Perlin(num_classes=2, image_size=SIZE, seed=0, modes=("fbm", "worley"))


def test_perlin_jitter_zero_keeps_class_parameters():
    gen = Perlin(num_classes=3, image_size=SIZE, seed=0, jitter=0.0)
    a, b = gen.params(1, 0), gen.params(1, 1)
    assert _class_part(a) == _class_part(b) and a["noise_seed"] != b["noise_seed"]


def test_perlin_kernel_matches_numpy_reference():
    spec = importlib.util.spec_from_file_location("perlin_reference", ROOT / "benchmarks/synth_reference/perlin.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    gen = Perlin(num_classes=6, image_size=SIZE, seed=5)
    for label in range(6):
        assert np.array_equal(gen.render(label, 2), ref.render(label, 2, SIZE, 5))


# --- dead leaves ---


def test_dead_leaves_radii_follow_the_power_law_within_range():
    gen = DeadLeaves(num_classes=20, image_size=64, seed=2)
    for label in range(20):
        p = gen.params(label, 0)
        assert gen.rmin_range[0] * 64 <= p["rmin"] <= gen.rmin_range[1] * 64
        assert gen.rmax_range[0] * 64 <= p["rmax"] <= gen.rmax_range[1] * 64
        assert gen.alpha_range[0] <= p["alpha"] <= gen.alpha_range[1]
        r = draw_leaves(p, np.random.default_rng(label).random((4000, 9)), 64)["r"]
        assert r.min() >= p["rmin"] and r.max() <= p["rmax"]
        # Half the radii lie below the median of the truncated density r^-alpha (4000 draws:
        # binomial std 0.008; a wrong exponent or uniform radii move the fraction further).
        e, lo, hi = 1.0 - p["alpha"], p["rmin"], p["rmax"]
        median = (lo**e + 0.5 * (hi**e - lo**e)) ** (1.0 / e)
        assert abs((r <= median).mean() - 0.5) < 0.03


def test_dead_leaves_cover_the_image():
    gen = DeadLeaves(num_classes=12, image_size=48, seed=4)
    assert gen.covers
    for label in range(12):
        p = gen.params(label, 1)
        assert p["covers"]
        img, stats = gen.render_with_stats(label, 1)
        assert stats["uncovered_pixels"] == 0 and 0 < stats["leaves"] < gen.max_shapes
        background = (np.asarray(p["background"]) * 255.0 + 0.5).astype(np.uint8)
        assert not (img == background).all(-1).any(), f"class {label} shows background pixels"


def test_dead_leaves_fixed_count_leaves_background():
    gen = DeadLeaves(num_classes=3, image_size=48, seed=4, num_shapes=3, rmax_range=(0.1, 0.15))
    assert not gen.covers and not gen.params(0, 0)["covers"]
    img, stats = gen.render_with_stats(0, 0)
    assert stats["leaves"] == 3 and stats["uncovered_pixels"] > 0
    background = (np.asarray(gen.params(0, 0)["background"]) * 255.0 + 0.5).astype(np.uint8)
    assert (img == background).all(-1).sum() >= stats["uncovered_pixels"]


def test_dead_leaves_shapes_are_honoured():
    for shape in ("disk", "square", "triangle"):
        gen = DeadLeaves(num_classes=4, image_size=SIZE, seed=0, shapes=(shape,), textures=("flat",))
        assert {gen.params(label, 0)["shape"] for label in range(4)} == {shape}
        assert gen.params(0, 0)["shade"] == 0.0
    with pytest.raises(ValueError, match="shapes"):
        DeadLeaves(num_classes=2, image_size=SIZE, seed=0, shapes=("hexagon",))
    with pytest.raises(ValueError, match="rmax_range"):
        DeadLeaves(num_classes=2, image_size=SIZE, seed=0, rmin_range=(0.1, 0.3), rmax_range=(0.2, 0.5))
