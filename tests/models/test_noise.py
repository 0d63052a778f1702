"""Keyed randomness (models/noise.py): dropout and drop-path masks that are functions of the sample,
the layer and the element, so that shards, stages, batch compositions and recomputation all draw
the masks one process draws."""
import pytest
import torch

from vitscale.models import create_model
from vitscale.models.noise import KeyedDropout, element_index, keyed_dropout, keyed_uniform, sample_keys
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.models.vit import init_weights

NOISY = dict(img_size=32, patch_size=8, num_classes=5, depth=2, num_heads=4, drop_rate=0.2, attn_drop_rate=0.2,
             drop_path_rate=0.3)


def _vit(**kw):
    model = create_model("vit_tiny_patch16", **{**NOISY, **kw})
    return init_weights(model, 3).train()


def test_a_sample_draws_the_same_masks_alone_or_in_any_batch():
    model, x = _vit(), torch.randn(6, 3, 32, 32)
    keys = sample_keys(7, torch.arange(100, 106))
    batched = model(x, noise=keys)
    for i in (0, 3, 5):
        torch.testing.assert_close(model(x[i:i + 1], noise=keys[i:i + 1]), batched[i:i + 1], rtol=0, atol=1e-6)
    reordered = model(x.flip(0), noise=keys.flip(0)).flip(0)
    torch.testing.assert_close(reordered, batched, rtol=0, atol=1e-6)


def test_masks_are_active_and_keyed():
    model, x = _vit(), torch.randn(4, 3, 32, 32)
    keys = sample_keys(7, torch.arange(4))
    a = model(x, noise=keys)
    assert torch.equal(a, model(x, noise=keys))  # the same keys: the same function
    assert not torch.allclose(a, model(x, noise=sample_keys(8, torch.arange(4))))  # another seed: other masks
    assert not torch.allclose(a, model.eval()(x))  # the noise changes the output in training...
    assert torch.equal(model.eval()(x), model.eval()(x, noise=keys))  # ...and none is drawn in eval


def test_keep_rate_and_independence():
    keys = sample_keys(0, torch.arange(64))
    u = keyed_uniform(keys, 12345, element_index((32, 48)))  # (64, 32, 48)
    assert u.shape == (64, 32, 48) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - 12 ** -0.5) < 0.005
    kept = (keyed_dropout(torch.ones(64, 32, 48), 0.1, keys, 1) != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005
    # neighbouring samples, sites and elements are uncorrelated
    other_site = keyed_uniform(keys, 12346, element_index((32, 48)))
    for a, b in ((u[:-1], u[1:]), (u, other_site), (u[..., :-1], u[..., 1:])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01


def test_a_tensor_shard_draws_its_slice_of_the_whole_mask():
    keys = sample_keys(1, torch.arange(3))
    whole = KeyedDropout(0.5).train()
    whole.site = 99
    x = torch.randn(3, 5, 12)
    full = whole(x, keys)
    for rank in range(4):
        part = KeyedDropout(0.5).train()
        part.site, part.tensor_slice = 99, (rank * 3, 12)
        torch.testing.assert_close(part(x[..., rank * 3:(rank + 1) * 3], keys), full[..., rank * 3:(rank + 1) * 3],
                                   rtol=0, atol=0)


def _sharded_forward_matches(rank: int, world: int) -> None:
    import torch.distributed as dist

    for options in ({}, {"parallel_block": True, "qk_norm": True}):
        whole = _vit(**options)
        with torch.device("meta"):
            part = create_model("vit_tiny_patch16", **{**NOISY, **options})
        parallelize_vit(part, rank, world, dist.group.WORLD)
        part.to_empty(device="cpu")
        part = init_weights(part, 3).train()
        x, keys = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), sample_keys(5, torch.arange(2))
        # attention dropout over this rank's heads, MLP dropout over its hidden units, drop-path
        # and the replicated dropouts: the whole model's masks, so the whole model's output
        torch.testing.assert_close(part(x, noise=keys), whole(x, noise=keys), rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_tensor_shards_compute_the_whole_models_noisy_forward():
    from tests.conftest import run_in_gloo

    run_in_gloo(_sharded_forward_matches, 2)


def test_recomputation_draws_the_same_masks():
    torch.manual_seed(0)
    plain, recomputed = _vit(), _vit()
    recomputed.set_grad_checkpointing(1)
    x, keys = torch.randn(4, 3, 32, 32), sample_keys(2, torch.arange(4))
    for model in (plain, recomputed):
        model(x, noise=keys).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
