"""On-the-fly synthetic data: pure function of (label, instance, seed), layout-independent order."""
import numpy as np
import pytest
import torch

from vitscale.data.synthetic import create_generator, list_generators
from vitscale.data.synthetic_loader import StepSampler, build_synthetic_loader
from vitscale.data.transforms import normalize


@pytest.mark.parametrize("name", list_generators())
def test_generator_is_a_pure_function(name):
    a = create_generator(name, num_classes=10, image_size=32, seed=3)
    b = create_generator(name, num_classes=10, image_size=32, seed=3)
    img = a.render(4, 17)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    b.render(0, 0)  # call order must not matter
    assert np.array_equal(img, b.render(4, 17))
    assert not np.array_equal(img, a.render(4, 18))
    assert not np.array_equal(img, create_generator(name, 10, 32, seed=4).render(4, 17))


def test_unknown_generator_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown synthetic generator 'gratngs'; did you mean gratings"):
        create_generator("gratngs", 10, 32, 0)


def _steps(sampler, steps):
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.accum)] for _ in range(steps)]


@pytest.mark.parametrize("micro, world", [(8, 1), (4, 2), (2, 4), (8, 2)])
def test_every_layout_sees_the_same_samples_per_step(micro, world):
    ref = _steps(StepSampler(100, 16, 16, 0, 1, seed=1), 10)
    for step in range(10):
        got = []
        for rank in range(world):
            per_rank = _steps(StepSampler(100, micro, 16, rank, world, seed=1), 10)[step]
            got += [i for mb in per_rank for i in mb]
        assert sorted(got) == sorted(ref[step][0])


def test_resume_continues_the_stream_and_epochs_are_permutations():
    full = [i for step in _steps(StepSampler(40, 8, 8, 0, 1, seed=2), 10) for mb in step for i in mb]
    resumed = [i for step in _steps(StepSampler(40, 8, 8, 0, 1, seed=2, start_step=4), 6) for mb in step for i in mb]
    assert resumed == full[32:]
    assert sorted(full[:40]) == list(range(40)) and sorted(full[40:80]) == list(range(40))
    assert full[:40] != full[40:80]  # each epoch reshuffled


def test_loader_yields_uint8_batches_with_workers_equal_to_without():
    kw = dict(source="gratings", num_classes=10, image_size=32, instances=20, seed=0, micro_batch=4,
              global_batch=8, data_rank=1, data_world=2)
    a, b = iter(build_synthetic_loader(**kw, num_workers=0)), iter(build_synthetic_loader(**kw, num_workers=2))
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.dtype == torch.uint8 and xa.shape == (4, 3, 32, 32) and ya.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_normalize_on_device():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    y = normalize(x, [0.5] * 3, [0.5] * 3, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.flatten().tolist() == [-1.0, 1.0] * 3
