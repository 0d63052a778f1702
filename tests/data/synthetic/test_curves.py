"""Curve generators: ``rcdb``, ``visual_atom``, ``bezier``, and their stroking primitive ``draw``."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic.draw import stroke_polyline, stroke_polylines
from vitscale.data.synthetic.rcdb import RCDB, perlin_1d
from vitscale.data.synthetic.visual_atom import VisualAtom

NAMES = ["rcdb", "visual_atom", "bezier"]
SIZE = 48
# Small but structurally complete settings keep the tests fast.
FAST = {"rcdb": {}, "visual_atom": {"orbits": 24, "points_per_orbit": 96}, "bezier": {"points_per_curve": 24}}


def _gen(name: str, num_classes: int = 6, seed: int = 3, image_size: int = SIZE, **kw):
    return create_generator(name, num_classes=num_classes, image_size=image_size, seed=seed, **{**FAST[name], **kw})


# -- the drawing primitive -------------------------------------------------------------------------


def test_stroke_covers_its_width_only():
    img = np.zeros((16, 16, 3), np.float64)
    stroke_polyline(img, [[2.0, 8.0], [13.0, 8.0]], width=3.0, color=(1.0, 0.5, 0.25))
    # Width 3 about row 8: rows 7..9 fully covered inside the segment, nothing 2 rows off.
    assert np.allclose(img[7:10, 3:13], [1.0, 0.5, 0.25])
    assert not img[:6].any() and not img[11:].any()
    # Round caps: half a width beyond the end points, and no further.
    assert img[8, 0].sum() == 0 and img[8, 15].sum() == 0 and img[8, 1, 0] > 0
    hard = np.zeros((16, 16, 3), np.uint8)
    stroke_polyline(hard, [[2.0, 8.0], [13.0, 8.0]], width=3.0, color=(255, 255, 255), antialias=False)
    assert set(np.unique(hard)) == {0, 255} and (hard[..., 0] > 0).sum() == 3 * 12 + 2 * 3  # + the caps


def test_stroke_joins_do_not_darken_and_closed_adds_a_segment():
    # Many collinear short segments must look like one segment: max coverage per polyline.
    one, many = np.zeros((12, 24, 3)), np.zeros((12, 24, 3))
    stroke_polyline(one, [[2.0, 5.3], [21.0, 5.3]], width=1.5, color=(1, 1, 1))
    stroke_polyline(many, np.stack([np.linspace(2, 21, 40), np.full(40, 5.3)], 1), width=1.5, color=(1, 1, 1))
    assert np.allclose(one, many)
    square = [[3.0, 3.0], [12.0, 3.0], [12.0, 12.0], [3.0, 12.0]]
    open_, closed = np.zeros((16, 16, 3)), np.zeros((16, 16, 3))
    stroke_polyline(open_, square, 1.0, (1, 1, 1))
    stroke_polyline(closed, square, 1.0, (1, 1, 1), closed=True)
    assert open_[8, 3].sum() == 0 and closed[8, 3].sum() == 3.0


def _brute_force_strokes(img, xs, ys, offsets, widths, colors, closed, antialias):
    """The module docstring's convention pixel by pixel over the whole image: per polyline, each
    pixel's largest coverage over its segments, composited in polyline order."""
    h, w = img.shape[:2]
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    for p in range(len(widths)):
        px, py = xs[offsets[p]:offsets[p + 1]], ys[offsets[p]:offsets[p + 1]]
        n = len(px)
        segs = [(i, (i + 1) % n) for i in range(n if closed and n > 2 else max(n - 1, 1))]
        half = 0.5 * max(widths[p], 1.0)
        cov = np.zeros((h, w))
        for a, b in segs:
            dx, dy = px[b] - px[a], py[b] - py[a]
            len2 = dx * dx + dy * dy
            t = np.clip(((gx - px[a]) * dx + (gy - py[a]) * dy) / len2, 0, 1) if len2 > 0 else np.zeros((h, w))
            dist = np.hypot(gx - px[a] - t * dx, gy - py[a] - t * dy)
            if antialias:
                c = np.clip(half + 0.5 - dist, 0, 1) * min(widths[p], 1.0)
            else:
                c = (dist <= half).astype(np.float64)
            cov = np.maximum(cov, c)
        img[:] = img * (1 - cov[..., None]) + np.asarray(colors[p]) * cov[..., None]
    return img


@pytest.mark.parametrize("closed, antialias", [(True, True), (False, True), (True, False)])
def test_strokes_equal_the_convention_evaluated_at_every_pixel(closed, antialias):
    # The kernel visits only pixels near each segment and keeps the smallest distance per pixel;
    # the reference measures every pixel's distance to every segment.
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 9, 6)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    xs, ys = rng.uniform(-3, 27, offsets[-1]), rng.uniform(-3, 23, offsets[-1])
    xs[offsets[2]] = xs[offsets[2] + 1]  # a vertical segment
    ys[offsets[3]] = ys[offsets[3] + 1]  # a horizontal one
    widths, colors = rng.uniform(0.2, 3.5, 6), rng.random((6, 3))
    got = np.zeros((20, 24, 3))
    stroke_polylines(got, xs, ys, offsets, widths, colors, closed=closed, antialias=antialias)
    want = _brute_force_strokes(np.zeros((20, 24, 3)), xs, ys, offsets, widths, colors, closed, antialias)
    assert np.abs(got - want).max() < 1e-9 and (want > 0).mean() > 0.1


def test_reused_scratch_memory_does_not_carry_over_between_images():
    # The kernels keep their buffers from call to call (per thread), sized for the largest image
    # so far: images of another size or generator in between must not change an image.
    first = _gen("visual_atom").render(1, 2)
    _gen("bezier", image_size=64).render(0, 0)
    create_generator("visual_atom", 3, 20, seed=1, orbits=5, points_per_orbit=7).render(2, 0)
    assert np.array_equal(_gen("visual_atom").render(1, 2), first)


def test_stroke_validates_its_inputs():
    with pytest.raises(ValueError, match="H, W, 3"):
        stroke_polyline(np.zeros((8, 8), np.uint8), [[0, 0], [4, 4]], 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="dtype"):
        stroke_polyline(np.zeros((8, 8, 3), np.int32), [[0, 0], [4, 4]], 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="offsets"):
        stroke_polylines(np.zeros((8, 8, 3)), np.zeros(4), np.zeros(4), np.array([0, 3]), np.ones(1), np.ones((1, 3)))


# -- every generator -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_determinism_and_content(name):
    gen = _gen(name)
    img = gen.render(2, 5)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert np.array_equal(img, gen.render(2, 5))
    gen.render(0, 0), gen.render(4, 9)  # nothing depends on call order
    assert np.array_equal(img, gen.render(2, 5))
    assert np.array_equal(img, _gen(name).render(2, 5)), "a fresh generator must draw the same bytes"
    assert not np.array_equal(img, gen.render(2, 6)), "instances of one class must differ"
    assert not np.array_equal(img, _gen(name, seed=4).render(2, 5)), "the seed must matter"
    # Non-trivial: strokes on a black background cover a real part of the image.
    lit = img.max(axis=2) > 0
    assert img.std() > 5 and 0.01 < lit.mean() < 0.99
    assert json.loads(json.dumps(gen.params(2, 5))) == gen.params(2, 5)
    for label in (-1, 6):
        with pytest.raises(ValueError, match="label"):
            gen.render(label, 0)


@pytest.mark.parametrize("name", NAMES)
def test_classes_differ(name):
    gen = _gen(name, num_classes=4)
    means = np.stack([np.mean([gen.render(k, i).astype(np.float64) for i in range(3)], axis=0) for k in range(4)])
    for a in range(4):
        for b in range(a):
            assert np.abs(means[a] - means[b]).mean() > 1.0, f"classes {a} and {b} look alike"


def test_same_bytes_in_a_fresh_process():
    code = ("import hashlib; from vitscale.data.synthetic import create_generator as c; "
            f"print(' '.join(hashlib.sha256(c(n, num_classes=6, image_size={SIZE}, seed=3, **kw).render(2, 5)"
            f".tobytes()).hexdigest() for n, kw in {FAST!r}.items()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = [hashlib.sha256(_gen(n).render(2, 5).tobytes()).hexdigest() for n in FAST]
    assert out == here


# -- RCDB ------------------------------------------------------------------------------------------


def test_rcdb_vertex_range_default_published_setting():
    gen = RCDB(num_classes=1000, image_size=SIZE, seed=0)
    counts = [gen.num_vertices(k) for k in range(1000)]
    assert min(counts) == 3 and max(counts) == 102 and len(set(counts)) == 100
    # 1000 classes over 100 vertex counts: 10 noise levels each, every class distinct.
    assert len({(c, float(a)) for c, a in zip(counts, gen.noise_levels)}) == 1000
    assert gen.params(517, 2)["num_vertices"] == counts[517]
    # Exactly the range, each count once, when num_classes equals its length.
    assert sorted(RCDB(100, SIZE, 0).vertex_counts.tolist()) == list(range(3, 103))


@pytest.mark.parametrize("num_classes", [1, 2, 3, 5, 12, 50])
def test_rcdb_custom_vertex_range(num_classes):
    gen = RCDB(num_classes=num_classes, image_size=SIZE, seed=1, vertices=(5, 9))
    counts = [gen.num_vertices(k) for k in range(num_classes)]
    assert all(5 <= c <= 9 for c in counts)
    assert [gen.params(k, 0)["num_vertices"] for k in range(num_classes)] == counts
    if num_classes >= 2:
        assert min(counts) == 5 and max(counts) == 9
    if num_classes <= 5:
        assert len(set(counts)) == num_classes  # spread evenly, no repeats
    else:
        assert set(counts) == {5, 6, 7, 8, 9}
    gen.render(num_classes - 1, 0)


def test_rcdb_validates_its_ranges():
    for bad in [(2, 9), (9, 5), (3.5, 9)]:
        with pytest.raises(ValueError, match="vertices"):
            RCDB(4, SIZE, 0, vertices=bad)


def test_perlin_is_periodic_smooth_and_bounded():
    grads = np.random.default_rng(0).uniform(-1, 1, size=5)
    x = np.linspace(0.0, 5.0, 501)
    y = perlin_1d(x, grads)
    assert np.abs(y).max() <= 1.0 and y.std() > 0.05
    assert np.allclose(perlin_1d(x + 5.0, grads), y) and abs(y[0] - y[-1]) < 1e-12
    assert np.allclose(y[::100], 0.0)  # zero at the lattice points
    assert np.abs(np.diff(y)).max() < 0.05  # continuous


# -- VisualAtom ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [5, 210, 1000])
def test_visual_atom_frequencies_in_published_range(num_classes):
    gen = VisualAtom(num_classes=num_classes, image_size=SIZE, seed=2)
    cats = [gen.category(k) for k in range(num_classes)]
    assert all(0 <= c["n1"] < c["n2"] <= 20 for c in cats)
    keys = {(c["n1"], c["n2"], tuple(c["amplitude_band"])) for c in cats}
    assert len(keys) == num_classes, "every class must be a distinct (n1, n2, amplitude band)"
    if num_classes == 210:  # all pairs n1 < n2 of 0..20, one amplitude band
        assert {(c["n1"], c["n2"]) for c in cats} == {(a, b) for a in range(21) for b in range(a + 1, 21)}
    p = gen.params(num_classes - 1, 3)
    lo, hi = p["amplitude_band"]
    assert (p["n1"], p["n2"]) == (cats[-1]["n1"], cats[-1]["n2"])
    assert all(lo * SIZE <= a <= hi * SIZE for a in p["amplitudes"])
    assert len(p["base_radii"]) == 200 and np.all(np.diff(p["base_radii"]) > 0)  # growing orbits


def test_visual_atom_custom_frequencies_and_validation():
    gen = VisualAtom(num_classes=30, image_size=SIZE, seed=0, frequencies=(2, 6), orbits=8)
    assert all(2 <= gen.category(k)["n1"] < gen.category(k)["n2"] <= 6 for k in range(30))
    with pytest.raises(ValueError, match="frequencies"):
        VisualAtom(num_classes=3, image_size=SIZE, seed=0, frequencies=(4, 4))


# -- Bezier ----------------------------------------------------------------------------------------


def test_bezier_classes_are_larger_than_instance_variation():
    gen = _gen("bezier", num_classes=6)

    def ink(k, i):  # where the strokes are, blurred: colours and widths carry no class
        mask = (gen.render(k, i).max(axis=2) > 0).astype(np.float64)
        return mask.reshape(SIZE // 8, 8, SIZE // 8, 8).mean(axis=(1, 3))

    maps = [[ink(k, i) for i in range(4)] for k in range(6)]
    within = np.mean([np.abs(m[i] - m[j]).mean() for m in maps for i in range(4) for j in range(i)])
    between = np.mean([np.abs(maps[a][i] - maps[b][i]).mean() for a in range(6) for b in range(a) for i in range(4)])
    assert between > 1.5 * within
    # The template is the class: fixed per label, same for every instance.
    assert gen.params(3, 0)["template"] == gen.params(3, 7)["template"] != gen.params(4, 0)["template"]
