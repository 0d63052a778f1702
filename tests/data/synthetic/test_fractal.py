"""FractalDB (fractal) and 3-D fractal views (exfractal): purity, the category search, category
files, rendering modes, flips and the z-buffer."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic.exfractal import evaluate_system_3d, search_category_3d
from vitscale.data.shards import load_categories, save_categories
from vitscale.data.synthetic.fractal import (BURN_IN, _pixels_per_axis, cdf_of, chaos_game_2d, evaluate_system,
                                             map_table, pick_map, pick_map_fast, search_category, splat, uniform01)

NAMES = ["fractal", "exfractal"]
SMALL = {"num_points": 3000}  # tests draw few points on small images


def small(name, num_classes=4, image_size=32, seed=3, **kw):
    return create_generator(name, num_classes, image_size, seed, **{**SMALL, **kw})


@pytest.mark.parametrize("name", NAMES)
def test_images_are_pure_functions(name):
    gen = small(name)
    img = gen.render(2, 7)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img.max() > 0 and len(np.unique(img.reshape(-1, 3), axis=0)) > 3  # drawn, not constant
    assert (img.max(axis=2) == 0).mean() > 0.05  # a figure on black, not a filled square
    assert np.array_equal(img, gen.render(2, 7))
    other = small(name)
    other.render(0, 1)  # call order must not matter
    assert np.array_equal(img, other.render(2, 7))
    assert not np.array_equal(img, gen.render(2, 8))
    assert not np.array_equal(img, small(name, seed=4).render(2, 7))


@pytest.mark.parametrize("name", NAMES)
def test_params_are_json_and_render_back_identically(name):
    gen = small(name, mode="patch")
    p = json.loads(json.dumps(gen.params(1, 5)))
    assert np.array_equal(gen.draw(p), gen.render(1, 5))


@pytest.mark.parametrize("name", NAMES)
def test_classes_differ(name):
    gen = small(name, num_classes=3)
    maps = [np.array(c["maps"]) for c in gen.categories()]
    assert all(a.shape != b.shape or not np.allclose(a, b) for i, a in enumerate(maps) for b in maps[i + 1:])
    means = [np.mean([gen.render(k, i) for i in range(6)], axis=0) for k in range(3)]
    assert all(np.abs(means[a] - means[b]).mean() > 1.0 for a in range(3) for b in range(a + 1, 3))


_CHILD = """
import hashlib, sys
from vitscale.data.synthetic import create_generator
for name in ("fractal", "exfractal"):
    gen = create_generator(name, 4, 32, 3, num_points=3000, mode="patch")
    print(hashlib.sha256(gen.render(2, 7).tobytes() + gen.render(3, 11).tobytes()).hexdigest())
"""


def test_same_bytes_in_a_separate_process():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, check=True).stdout.split()
    here = [hashlib.sha256(g.render(2, 7).tobytes() + g.render(3, 11).tobytes()).hexdigest()
            for g in (small(n, mode="patch") for n in NAMES)]
    assert out == here


@pytest.mark.parametrize("evaluate, width, threshold", [(evaluate_system, 6, 0.2), (evaluate_system_3d, 12, 0.1)])
def test_filling_threshold_accepts_exactly_the_systems_that_reach_it(evaluate, width, threshold):
    rng = np.random.default_rng(0)
    results = [evaluate(rng.uniform(-1, 1, (int(rng.integers(2, 9)), width)), fill_threshold=threshold,
                        chaos_seed=k) for k in range(400)]
    accepted = [f for f, ok in results if ok]
    rejected = [f for f, ok in results if not ok]
    assert accepted and rejected  # both directions are exercised
    assert min(accepted) >= threshold > max(rejected)


@pytest.mark.parametrize("search, evaluate, threshold", [(search_category, evaluate_system, 0.2),
                                                         (search_category_3d, evaluate_system_3d, 0.1)])
def test_search_is_a_pure_function_of_seed_and_label(search, evaluate, threshold):
    cat = search(5, 3, fill_threshold=threshold)
    assert cat == search(5, 3, fill_threshold=threshold) and cat != search(5, 4, fill_threshold=threshold)
    assert cat["fill"] >= threshold and cat["tries"] >= 1
    assert evaluate(np.array(cat["maps"]), cat["probs"], fill_threshold=threshold,
                    chaos_seed=cat["search_seed"]) == (cat["fill"], True)
    # The same candidate stream with a stricter threshold stops at the same or a later candidate.
    strict = search(5, 3, fill_threshold=threshold + 0.05)
    assert strict["tries"] >= cat["tries"] and strict["fill"] >= threshold + 0.05


def test_diverging_systems_are_rejected_and_render_deterministically():
    expanding = np.array([[1.5, 0.3, -0.2, 1.5, 0.5, 0.1]])
    assert evaluate_system(expanding) == (0.0, False)
    _, _, n_valid = chaos_game_2d(expanding, cdf_of([1.0]), np.ones((1, 3)), 10_000, 1)
    assert 0 < n_valid < 10_000
    gen = small("fractal", num_classes=1, categories=[{"maps": expanding.tolist(), "probs": [1.0]}])
    assert np.array_equal(gen.render(0, 0), gen.render(0, 0))


@pytest.mark.parametrize("name", NAMES)
def test_categories_round_trip_through_a_file(name, tmp_path):
    gen = small(name, num_classes=3)
    path = tmp_path / "categories.json"
    path.write_text("stale")  # replaced, not appended to
    save_categories(path, gen.categories(), generator=name, seed=3)
    cats = load_categories(path, name, 3)
    assert json.loads(path.read_text())["meta"] == {"generator": name, "seed": 3}
    assert os.listdir(tmp_path) == ["categories.json"]
    loaded = small(name, num_classes=3, categories=cats)
    assert loaded.categories() == gen.categories()
    for label, instance in [(0, 0), (1, 4), (2, 9)]:
        assert np.array_equal(loaded.render(label, instance), gen.render(label, instance))


@pytest.mark.parametrize("name, width", [("fractal", 6), ("exfractal", 12)])
def test_bad_category_lists_are_refused(name, width):
    good = {"maps": np.full((2, width), 0.3).tolist(), "probs": [0.5, 0.5]}
    with pytest.raises(ValueError, match="num_classes=2"):
        small(name, num_classes=2, categories=[good])
    with pytest.raises(ValueError, match=r"categories\[1\]\['maps'\]"):
        small(name, num_classes=2, categories=[good, {"maps": [[0.1] * (width - 1)]}])
    with pytest.raises(ValueError, match=r"categories\[0\]\['probs'\]"):
        small(name, num_classes=1, categories=[{**good, "probs": [-1.0, 2.0]}])


def test_a_file_that_is_not_a_category_file_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"maps": []}))
    with pytest.raises(ValueError, match="holds no category list"):
        load_categories(tmp_path / "x.json", "fractal", 3)
    save_categories(tmp_path / "y.json", [{}] * 3, generator="rcdb")
    with pytest.raises(ValueError, match="searched for generator 'rcdb', not 'fractal'"):
        load_categories(tmp_path / "y.json", "fractal", 3)


@pytest.mark.parametrize("name", NAMES)
def test_patch_mode_covers_the_points_of_point_mode(name):
    # Both modes draw the same orbit (the patch pattern is the instance's last draw), and a patch
    # always includes its centre pixel.
    point, patch = small(name, image_size=48), small(name, image_size=48, mode="patch")
    for label, instance in [(0, 0), (1, 3), (3, 6)]:
        lit_point = point.render(label, instance).max(axis=2) > 0
        lit_patch = patch.render(label, instance).max(axis=2) > 0
        assert np.all(lit_patch[lit_point]) and lit_patch.sum() > lit_point.sum()


@pytest.mark.parametrize("mode", ["point", "patch"])
def test_flipped_instances_are_mirror_images(mode):
    gen = small("fractal", image_size=40, mode=mode, patch_size=5)
    flags = [(gen.params(1, i)["flip_h"], gen.params(1, i)["flip_v"]) for i in range(16)]
    assert len(set(flags)) == 4  # instances draw all four flip combinations
    p = {**gen.params(1, 2), "flip_h": False, "flip_v": False}
    plain = gen.draw(p)
    assert np.array_equal(gen.draw({**p, "flip_h": True}), plain[:, ::-1])
    assert np.array_equal(gen.draw({**p, "flip_v": True}), plain[::-1])
    assert np.array_equal(gen.draw({**p, "flip_h": True, "flip_v": True}), plain[::-1, ::-1])


def _naive_splat(size, rows, cols, rgb, depth, mask, shade_min):
    """Each point's patch drawn in order with a z-test, as the published patch renderer does."""
    img = np.zeros((size, size, 3), np.uint8)
    zbuf = np.full((size, size), -np.inf)
    half = mask.shape[0] // 2
    for i in range(len(rows)):
        for dr, dc in np.argwhere(mask) - half:
            r, c = rows[i] + dr, cols[i] + dc
            if 0 <= r < size and 0 <= c < size and (depth is None or depth[i] >= zbuf[r, c]):
                if depth is None:
                    img[r, c] = rgb[i]
                else:
                    zbuf[r, c] = depth[i]
                    img[r, c] = (rgb[i] * (shade_min + (1 - shade_min) * depth[i]) + 0.5).astype(np.uint8)
    return img


@pytest.mark.parametrize("use_depth", [False, True])
def test_splat_equals_drawing_each_patch_in_order(use_depth):
    rng = np.random.default_rng(1)
    size, n = 12, 300
    rows, cols = rng.integers(0, size, n).astype(np.int32), rng.integers(0, size, n).astype(np.int32)
    rgb = rng.integers(0, 256, (n, 3)).astype(np.uint8)
    depth = np.round(rng.random(n), 1) if use_depth else None  # rounded: ties must go to the later point
    mask = rng.random((3, 3)) < 0.5
    mask[1, 1] = True
    got = splat(size, rows, cols, rgb, depth if use_depth else np.empty(0), mask, False, False, 0.25)
    assert np.array_equal(got, _naive_splat(size, rows, cols, rgb, depth, mask, 0.25))


@pytest.mark.parametrize("probs", [[0.3, 0.7], [0.25, 0.25, 0.5], [0.0, 1.0, 0.0, 2.0], [1e-9, 1.0, 1e-9],
                                   [0.1, 0.2, 0.05, 0.15, 0.1, 0.1, 0.2, 0.1], [1.0]])
def test_the_map_table_picks_the_map_the_comparisons_pick(probs):
    cdf = cdf_of(probs)
    table = map_table(cdf)
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**64, 3000, dtype=np.uint64).tolist()
    for c in cdf:  # words whose uniform lies on a cumulative probability or one step either side
        m = int(c * 2**53)
        words += [min(max(m + d, 0), 2**53 - 1) << 11 for d in (-1, 0, 1)]
    for b in (0, 1, 127, 128, 255):  # the bins' first and last words
        words += [b << 56, ((b + 1) << 56) - 1]
    for z in words:
        assert pick_map_fast(table, cdf, np.uint64(z)) == pick_map(cdf, uniform01(np.uint64(z))), (probs, z)


@pytest.mark.parametrize("flip_h, flip_v", [(False, False), (True, True)])
def test_point_mode_draws_the_orbit_as_splat_draws_it(flip_h, flip_v):
    # The point-mode renderer fuses the orbit, its bounding box and the drawing; the plain
    # pipeline (orbit, pixels per axis, splat with a one-pixel mask) must give the same bytes.
    gen = create_generator("fractal", 4, 40, seed=5, num_points=4000)
    diverging = {**gen.params(0, 0), "maps": [[1.01, 0.0, 0.0, 1.01, 0.1, 0.1]], "probs": [1.0],
                 "palette": [[1.0, 0.5, 0.2]]}  # leaves |x| <= 1e6 after about 1600 points
    for p in [gen.params(k, i) for k in range(4) for i in range(3)] + [diverging]:
        p = {**p, "flip_h": flip_h, "flip_v": flip_v}
        xy, rgb, n = chaos_game_2d(np.array(p["maps"]), cdf_of(p["probs"]), np.array(p["palette"]), 4000,
                                   p["chaos_seed"])
        start = min(BURN_IN, n)
        rows, cols = _pixels_per_axis(xy, start, n, 40, gen.margin_px)
        want = splat(40, rows, cols, rgb[start:n], np.empty(0), np.ones((1, 1), bool), flip_h, flip_v, 1.0)
        assert np.array_equal(gen.draw(p), want)
    assert 100 < n < 4000  # the diverging system stopped after its burn-in


def test_reused_orbit_buffers_do_not_carry_over_between_images():
    # The orbit's buffers are kept from image to image (per thread) and grow with num_points.
    first = small("fractal").render(1, 1)
    small("fractal", num_points=5000, image_size=48).render(0, 0)
    small("fractal", num_points=500, mode="patch").render(2, 3)
    assert np.array_equal(small("fractal").render(1, 1), first)


def test_nearer_points_win_and_are_brighter():
    rows, cols = np.array([5, 5, 2], np.int32), np.array([5, 5, 2], np.int32)
    rgb = np.array([[200, 200, 200], [100, 100, 100], [200, 200, 200]], np.uint8)
    img = splat(8, rows, cols, rgb, np.array([0.9, 0.2, 0.0]), np.ones((1, 1), bool), False, False, 0.25)
    assert img[5, 5, 0] == round(200 * (0.25 + 0.75 * 0.9))  # the nearer point, drawn first, stays
    assert img[2, 2, 0] == 50  # the farthest depth is shaded to SHADE_MIN


def test_grey_exfractal_is_depth_shaded():
    img = small("exfractal", image_size=48, color=False).render(1, 2)
    lit = img[img.max(axis=2) > 0]
    assert np.all(lit[:, 0] == lit[:, 1]) and np.all(lit[:, 1] == lit[:, 2])
    assert len(np.unique(lit[:, 0])) > 10  # shades of grey by depth, not a flat silhouette


def test_exfractal_instances_cycle_through_views():
    gen = small("exfractal", num_views=4, view_jitter_deg=0.0)
    azimuths = [gen.params(0, i)["azimuth_deg"] for i in range(8)]
    assert azimuths == [0.0, 90.0, 180.0, 270.0] * 2
    p = gen.params(0, 1)
    turned = gen.draw({**p, "azimuth_deg": p["azimuth_deg"] + 60.0})
    assert not np.array_equal(turned, gen.draw(p))
    persp = small("exfractal", num_views=4, projection="perspective")
    assert not np.array_equal(persp.render(0, 1), small("exfractal", num_views=4).render(0, 1))


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_say_what_to_change(name):
    gen = small(name, num_classes=2)
    with pytest.raises(ValueError, match=r"label 2 outside \[0, 2\)"):
        gen.render(2, 0)
    with pytest.raises(ValueError, match="mode='dots'"):
        small(name, mode="dots")
    with pytest.raises(ValueError, match="patch_size=4"):
        small(name, patch_size=4)
