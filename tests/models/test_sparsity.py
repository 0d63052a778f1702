"""Weight-sparsity masks (models/sparsity.py) on plain tensors and models: the n:m pattern and the
magnitude order it keeps, unstructured thresholds, Zhu & Gupta's schedule, the layers it applies to,
and the layout checks; the config's rejections of model.sparsity."""
import pytest
import torch

from vitscale.config import ConfigError, load_config
from vitscale.experiment import load_experiment
from vitscale.models import create_model
from vitscale.models.sparsity import magnitude_mask, nm_mask, sparse_linears, target_sparsity
from vitscale.train.sparsity import Sparsity

from tests.conftest import TINY


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_m_along_the_input(n, m):
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(weight, n, m)
    groups, kept = weight.abs().reshape(6, -1, m), mask.reshape(6, -1, m)
    assert (kept.sum(-1) == n).all()
    # Every kept weight is at least as large as every dropped one of its group.
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


def test_nm_mask_refuses_a_width_that_does_not_split_into_groups():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_magnitude_mask_zeros_the_smallest_fraction_of_the_matrix(sparsity):
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(weight, sparsity)
    assert (~mask).sum().item() == round(sparsity * weight.numel())
    assert weight.abs()[mask].min() > weight.abs()[~mask].max()


def test_gradual_schedule_is_zhu_and_gupta_cubic():
    # "To prune, or not to prune" (2017), eq. 1: 0 before t0, s_f from t0 + n dt on, and half-way
    # through the ramp s_f (1 - 0.5^3) = 0.875 s_f; between updates (every dt steps) the value holds.
    assert target_sparsity(9, 0.8, 10, 20) == 0.0
    assert target_sparsity(15, 0.8, 10, 20) == pytest.approx(0.8 * 0.875)
    assert target_sparsity(20, 0.8, 10, 20) == target_sparsity(99, 0.8, 10, 20) == 0.8
    levels = [target_sparsity(t, 0.8, 10, 20) for t in range(10, 21)]
    assert levels == sorted(levels) and levels[1] - levels[0] > levels[-1] - levels[-2]  # fast first, slow last
    assert target_sparsity(17, 0.8, 10, 20, every=5) == target_sparsity(15, 0.8, 10, 20)


def test_sparsity_applies_to_the_block_linears_of_both_clip_towers():
    vit = create_model("vit_tiny_patch16", img_size=32, depth=2, num_classes=5)
    names = [name for name, _ in sparse_linears(vit)]
    assert names == [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    clip = create_model("clip_tiny", vision={"layers": 2}, text={"layers": 2})
    towers = {name.split(".")[0] for name, _ in sparse_linears(clip)}
    assert towers == {"visual", "text"} and len(sparse_linears(clip)) == 16


def test_gradual_masks_only_grow_and_reach_the_target():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", img_size=32, depth=1, num_classes=5)
    cfg = load_config(TINY, ["model.sparsity.pattern=unstructured", "model.sparsity.target=0.8",
                             "model.sparsity.schedule=gradual", "model.sparsity.start_step=2",
                             "model.sparsity.end_step=6"]).model.sparsity
    sparsity = Sparsity(cfg, 10, model, parameters=sum(p.numel() for p in model.parameters()))
    pruned, levels = None, []
    for step in range(0, 8):
        with torch.no_grad():  # a stand-in optimizer step that moves every weight, the pruned ones too
            for _, layer in sparsity.layers:
                layer.weight.add_(torch.randn_like(layer.weight) * 1e-3)
        sparsity.apply_()
        if sparsity.update(step):
            sparsity.apply_()
        now = {name: layer.weight == 0 for name, layer in sparsity.layers}
        if pruned is not None:
            assert all((now[name] | ~pruned[name]).all() for name in now)  # what was pruned stays pruned
        pruned = now
        levels.append(sparsity.record("cpu")["sparsity"])
    assert levels[:3] == [0.0, 0.0, 0.0] and levels[-1] == pytest.approx(0.8, abs=1e-4)
    assert levels == sorted(levels)


@pytest.mark.parametrize("overrides, message", [
    (["model.sparsity.pattern=2:4", "model.sparsity.target=0.7"], "contradicts pattern=2:4, which zeros 0.5"),
    (["model.sparsity.pattern=2:4", "model.sparsity.schedule=gradual"], "use schedule=from_start"),
    (["model.sparsity.pattern=unstructured"], "needs model.sparsity.target"),
    (["model.sparsity.pattern=4:2"], "must be 'n:m' with 0 < n < m"),
    (["model.sparsity.pattern=2:4", "parallel.zero=3"], "cannot run with parallel.zero=3"),
    (["model.sparsity.pattern=unstructured", "model.sparsity.target=0.5", "model.sparsity.schedule=gradual",
      "model.sparsity.end_step=400"], "end_step=400 <= train.steps=300"),
])
def test_bad_sparsity_configs_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_nm_groups_must_not_straddle_tensor_shards():
    # 1:32 fits the whole proj (192 inputs) but not a quarter of it (48) under tensor 4.
    load_experiment(TINY, ["model.sparsity.pattern=1:32"])
    with pytest.raises(ConfigError, match="blocks.0.attn.proj has input width 48 on each of parallel.tensor=4"):
        load_experiment(TINY, ["model.sparsity.pattern=1:32", "parallel.tensor=4"])


def test_an_nm_pattern_reads_as_text_not_as_a_base_60_number():
    assert load_config(TINY, ["model.sparsity.pattern=2:4"]).model.sparsity.pattern == "2:4"


def test_a_checkpoint_without_masks_is_ranked_again():
    """A resharded or dense checkpoint carries no masks: pruned (zero) weights stay pruned, dense ones are
    pruned to the schedule's level."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16", img_size=32, depth=1, num_classes=5)
    cfg = load_config(TINY, ["model.sparsity.pattern=2:4"]).model.sparsity
    trained = Sparsity(cfg, 10, model)
    trained.update(0)
    trained.apply_()
    before = {name: mask.clone() for name, mask in trained.masks.items()}
    resumed = Sparsity(cfg, 10, model)  # a fresh run's object, as after a load without masks
    resumed.rank_again(5)
    assert all(torch.equal(resumed.masks[name], before[name]) for name in before)
    dense = create_model("vit_tiny_patch16", img_size=32, depth=1, num_classes=5)
    fresh = Sparsity(cfg, 10, dense)
    fresh.rank_again(5)
    fresh.apply_()
    assert fresh.record("cpu")["sparsity"] == 0.5
