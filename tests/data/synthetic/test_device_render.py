"""``data.render=device``: the generators' ``render_batch`` (``vitscale/data/synthetic/device.py``)
against their numba renderers, its determinism, and the config checks. The 2-process training
equality is in tests/train/test_parallel.py (``device_data2``)."""
import numpy as np
import pytest
import torch
from numba import njit

from tests.conftest import ROOT
from vitscale.config import ConfigError
from vitscale.data.sources import device_generators
from vitscale.data.synthetic import create_generator
from vitscale.data.synthetic.device import splitmix_uniform
from vitscale.data.synthetic.fractal import splitmix64, uniform01
from vitscale.data.synthetic_loader import build_synthetic_loader
from vitscale.experiment import load_experiment

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # small tensors (tests/conftest.py)

CPU = torch.device("cpu")
SIZE = 64
DEVICE_NAMES = ["fractal", "exfractal", "rcdb", "visual_atom", "perlin"]
# Fewer chaos-game points and a quarter of VisualAtom's orbits keep the tests short; the rest are the
# defaults (../shared/acceptance/device_synthetic renders 100 default images per generator).
PARAMS = {"fractal": {"num_points": 30000}, "exfractal": {"num_points": 30000}, "visual_atom": {"orbits": 50}}
_GENERATORS = {}


def _generator(name: str):
    if name not in _GENERATORS:  # FractalDB's category search runs once per module
        _GENERATORS[name] = create_generator(name, num_classes=4, image_size=SIZE, seed=0, **PARAMS.get(name, {}))
    return _GENERATORS[name]


def occupancy(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> where the brightest channel exceeds a quarter of its mean (the acceptance's measure)."""
    m = img.max(-1)
    return m > 0.25 * m.mean()


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_render_batch_matches_the_cpu_renderer(name):
    g = _generator(name)
    labels, instances = torch.tensor([0, 1, 2, 3, 1, 3]), torch.tensor([0, 5, 2, 7, 11, 1])
    out = g.render_batch(labels, instances, CPU)
    assert out.dtype == torch.uint8 and out.device == CPU and out.shape == (6, 3, SIZE, SIZE)
    for i in range(len(labels)):
        ref = g.render(int(labels[i]), int(instances[i]))  # (H, W, 3) uint8, numba
        got = out[i].permute(1, 2, 0).numpy()
        a, b = occupancy(ref), occupancy(got)
        iou = (a & b).sum() / max((a | b).sum(), 1)
        assert iou >= 0.9, f"{name} image {i}: occupancy IoU {iou:.3f} against the CPU renderer"
        assert a.sum() > 0.02 * SIZE * SIZE  # the image shows something
        # Not only the shape: most drawn pixels have the CPU's colour within a few levels.
        close = (np.abs(got.astype(int) - ref.astype(int)).max(-1) <= 3)[a | b].mean()
        assert close >= 0.8, f"{name} image {i}: {close:.2f} of the drawn pixels have the CPU renderer's colour"


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_an_image_does_not_depend_on_its_batch(name):
    g = _generator(name)
    labels, instances = torch.tensor([2, 0, 3, 1]), torch.tensor([4, 9, 0, 2])
    whole = g.render_batch(labels, instances, CPU)
    assert torch.equal(whole, g.render_batch(labels, instances, CPU))  # the same call, the same bytes
    alone = g.render_batch(labels[2:3], instances[2:3], CPU)
    swapped = g.render_batch(labels[[3, 0]], instances[[3, 0]], CPU)
    assert torch.equal(alone[0], whole[2])
    assert torch.equal(swapped[0], whole[3]) and torch.equal(swapped[1], whole[0])
    assert not torch.equal(whole[0], whole[1])


def test_chaos_game_draws_the_cpu_renderers_random_numbers_by_index():
    @njit
    def stream(seed, n):
        out, state = np.empty(n), np.uint64(seed)
        for i in range(n):
            state, z = splitmix64(state)
            out[i] = uniform01(z)
        return out

    seeds = [3, 2**62 + 12345, 2**63 - 1]
    index = torch.tensor([0, 1, 999, 4095])
    for seed in seeds:
        ref = stream(seed, 4096)[index.numpy()]
        got = splitmix_uniform(torch.tensor([seed])[:, None], index[None])[0].numpy()
        assert np.array_equal(got, ref)


def test_patch_mode_and_flips_follow_the_cpu_renderer():
    g = create_generator("fractal", num_classes=2, image_size=48, seed=1, mode="patch", num_points=20000)
    labels, instances = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    flips = {(g.params(int(k), int(i))["flip_h"], g.params(int(k), int(i))["flip_v"]) for k, i in zip(labels, instances)}
    assert len(flips) > 1  # the instances differ in their mirrors
    out = g.render_batch(labels, instances, CPU)
    for i in range(3):
        a = occupancy(g.render(int(labels[i]), int(instances[i])))
        b = occupancy(out[i].permute(1, 2, 0).numpy())
        assert (a & b).sum() / (a | b).sum() >= 0.95


def test_the_device_loader_passes_the_workers_samples_without_images():
    args = dict(source="fractal", num_classes=4, image_size=32, instances=10, seed=5, micro_batch=4, global_batch=16,
                data_rank=1, data_world=2, num_workers=0, params={"num_points": 2000})
    workers = iter(build_synthetic_loader(**args))
    device = iter(build_synthetic_loader(**args, render="device"))
    g = create_generator("fractal", 4, 32, 5, num_points=2000)
    for _ in range(3):
        images, labels = next(workers)
        dev_labels, dev_instances = next(device)
        assert torch.equal(labels, dev_labels) and dev_instances.dtype == torch.int64
        for k, i, img in zip(dev_labels.tolist(), dev_instances.tolist(), images):
            assert torch.equal(img, torch.from_numpy(g.render(k, i)).permute(2, 0, 1))  # the same sample


@pytest.mark.parametrize("overrides, message", [
    (["data.source=gratings", "data.render=device"],
     "data.render=device: generator 'gratings' has no device renderer (render_batch); those that have one are "),
    (["data.source=digits", "data.render=device"], "data.render=device renders synthetic generators on the fly"),
    (["data.source=fractal", "data.render=device", "data.packing.seq_len=64", "model.pos_embed=factorized",
      "model.global_pool=avg"], "data.packing with data.render=device is not supported"),
    (["data.render=gpu"], "data.render"),
])
def test_device_rendering_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_experiment(ROOT / "configs/vit_tiny.yaml", overrides)
    assert message in str(e.value)
    if "no device renderer" in message:
        assert all(name in str(e.value) for name in DEVICE_NAMES)


def test_the_generators_with_device_kernels():
    assert sorted(device_generators()) == sorted(DEVICE_NAMES)
    cfg = load_experiment(ROOT / "configs/vit_tiny.yaml", ["data.source=rcdb", "data.render=device"]).cfg
    assert cfg.data.render == "device"
