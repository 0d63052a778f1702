"""Fine-tuning starts (issue 10): timm weights give timm's features, position embeddings are
resampled as timm resamples them, a new class count replaces only the head, mismatches name
the tensors; the recipe's config keys reach timm's implementations."""
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from tests.conftest import TINY
from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.models.interop import create_timm_model, timm_kwargs
from vitscale.train.augment import BatchAugment
from vitscale.train.engine import build_model
from vitscale.train.objective import build_objective
from vitscale.train.optim import layer_decay_groups

SMALL = ["model.patch_size=8", "model.depth=2", "model.num_heads=3", "data.num_workers=0"]


def _cfg(*overrides):
    """The experiment (config + resolved model) of the tiny config with ``overrides``."""
    return load_experiment(TINY, SMALL + list(overrides))


def _timm_vit(image_size: int, classes: int):
    """timm's own VisionTransformer with the architecture of our config, random weights."""
    ours = build_model(_cfg(f"data.image_size={image_size}", f"data.num_classes={classes}"))
    torch.manual_seed(3)
    model = create_timm_model(timm_kwargs(ours.cfg))
    for p in model.parameters():  # nothing left at an init that our init would match by chance
        p.data.normal_(0, 0.05)
    return model.eval()


def test_timm_weights_give_timms_features_with_a_new_head(tmp_path):
    timm_vit = _timm_vit(32, classes=7)
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    cfg = _cfg("data.image_size=32", "data.num_classes=10", f"model.init={tmp_path / 'timm.safetensors'}")
    ours, fresh = build_model(cfg).eval(), build_model(_cfg("data.image_size=32", "data.num_classes=10")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_vit.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   timm_vit.forward_head(timm_vit.forward_features(x), pre_logits=True))
    assert ours.head.weight.shape == (10, ours.num_features)
    # the new head is the one the run initialises from its seed, not the file's 7-class head
    torch.testing.assert_close(ours.head.weight, fresh.head.weight, rtol=0, atol=0)
    assert not torch.equal(ours.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)


def test_pos_embed_resampled_as_timm_does_for_a_new_resolution(tmp_path):
    timm_32 = _timm_vit(32, classes=10)
    state = {k: v.contiguous() for k, v in timm_32.state_dict().items()}
    torch.save(state, tmp_path / "timm.pt")
    ours = build_model(_cfg("data.image_size=48", f"model.init={tmp_path / 'timm.pt'}")).eval()
    expected = resample_abs_pos_embed(state["pos_embed"], [6, 6], [4, 4], num_prefix_tokens=1)
    assert ours.pos_embed.shape == expected.shape == (1, 37, ours.num_features)
    torch.testing.assert_close(ours.pos_embed.data, expected, rtol=0, atol=0)
    # and timm loading the same file into its model at 48 px computes what ours computes
    timm_48 = create_timm_model(timm_kwargs(ours.cfg)).eval()
    timm_48.load_state_dict(checkpoint_filter_fn(dict(state), timm_48))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_48(x), rtol=1e-5, atol=1e-5)


def test_mismatch_names_the_tensors(tmp_path):
    other = build_model(_cfg("data.image_size=32", "model.embed_dim=96"))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"model.init=.*shape mismatch.*patch_embed\.proj\.weight"):
        build_model(_cfg("data.image_size=32", f"model.init={tmp_path / 'other.pt'}"))
    deeper = build_model(_cfg("data.image_size=32", "model.depth=3"))
    torch.save(deeper.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(ValueError, match=r"unexpected \['blocks\.2\."):
        build_model(_cfg("data.image_size=32", f"model.init={tmp_path / 'deeper.pt'}"))


def test_config_errors_name_the_key(tmp_path):
    for overrides, match in [
            (["data.source=digits", "data.num_classes=5"], "data.num_classes=10"),
            (["data.mixup=0.8", "train.micro_batch=15", "train.global_batch=30"], "must be even"),
            (["optim.layer_decay=1.5"], "optim.layer_decay"),
            (["train.ema=0.99", "parallel.zero=3"], "train.ema"),
            (["eval.every=5"], "set data.test"),
            (["data.test=nowhere/at/all"], "data.test=nowhere"),
            (["data.rand_augment=m9"], "RandAugment spec"),
            ([f"model.init={tmp_path}/missing.pt"], "model.init=")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(*overrides)


def test_layer_decay_and_soft_targets_come_from_timm():
    exp = _cfg("optim.layer_decay=0.5", "train.lr=1.0")
    model = build_model(exp)
    groups = layer_decay_groups(model, 0.05, exp.cfg.train.lr, 0.5, set(exp.model.no_weight_decay))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lrs = [lr_of[id(p)] for p in (model.patch_embed.proj.weight, model.blocks[0].mlp.fc1.weight,
                                  model.blocks[1].mlp.fc1.weight, model.head.weight)]
    assert lrs == [0.125, 0.25, 0.5, 1.0]  # depth 2: stem, block 0, block 1, head each x 2
    assert {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]} >= {id(model.pos_embed)}

    cfg = _cfg("data.mixup=0.8", "data.cutmix=1.0", "data.random_erasing=1.0", "train.label_smoothing=0.1").cfg
    augment = BatchAugment(cfg, torch.device("cpu"))
    images, labels = torch.zeros(8, 3, 32, 32), torch.arange(8) % 10
    mixed, soft = augment(images, labels)
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(-1), torch.ones(8))
    assert mixed.abs().sum() > 0  # erased patches hold noise
    loss = build_objective(cfg, "classifier")(torch.zeros(8, 10), soft)
    torch.testing.assert_close(loss, torch.tensor(10.0).log())  # uniform logits: log(classes) for any target


@pytest.mark.distributed
def test_new_head_and_resolution_load_into_every_layout(tmp_path):
    """A 7-class, 32 px file starts a 10-class, 48 px run identically when data-parallel,
    tensor-sharded or pipelined: the head swap and the pos-embed resampling happen on the
    whole-model tensors before slicing."""
    from tests.conftest import launch_layouts, train_losses

    torch.manual_seed(5)
    source = build_model(_cfg("data.image_size=32", "data.num_classes=7", "model.num_heads=4"))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "init.safetensors"))
    common = SMALL + ["model.num_heads=4", "data.image_size=48", "data.source=gratings", "train.steps=2",
                      "log.every=1", "train.micro_batch=4", "train.global_batch=8", "train.seed=3",
                      f"model.init={tmp_path / 'init.safetensors'}", "checkpoint.at_end=false"]
    layouts = {"data2": ["parallel.zero=1"], "tensor2": ["parallel.tensor=2", "train.micro_batch=8"],
               "pipe2": ["parallel.pipe=2", "train.micro_batch=4"]}
    launch_layouts(tmp_path, 2, layouts, common)
    ref = train_losses(tmp_path / "data2")
    assert len(ref) == 2
    for name in ("tensor2", "pipe2"):
        assert train_losses(tmp_path / name) == pytest.approx(ref, rel=1e-5), name
