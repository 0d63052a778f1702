"""Config keys of the architecture options (issue 11): what they build, and clear early errors
for combinations that cannot work."""
import pytest

from tests.conftest import ROOT, TINY
from vitscale.config import ConfigError
from vitscale.experiment import load_experiment


def test_vit_22b_config_states_the_whole_recipe():
    exp = load_experiment(ROOT / "configs" / "vit_22b.yaml")
    cfg, arch = exp.cfg, exp.model.arch
    assert arch.qk_norm and arch.parallel_block and not arch.qkv_bias and not arch.norm_bias
    assert cfg.train.loss == "sigmoid"


def test_option_keys_reach_the_model():
    kwargs = load_experiment(TINY, ["model.bias=false", "model.dual_patchnorm=true", "model.moe.blocks=2",
                                    "model.moe.experts=4", "model.moe.slots=2"]).model.kwargs
    assert kwargs["qkv_bias"] is False and kwargs["norm_bias"] is False and kwargs["dual_patchnorm"] is True
    assert (kwargs["moe_blocks"], kwargs["moe_experts"], kwargs["moe_slots"]) == (2, 4, 2)
    assert "moe_blocks" not in load_experiment(TINY).model.kwargs


PACK = ["data.packing.seq_len=16"]
FACTORIZED = ["model.pos_embed=factorized", "model.class_token=false", "model.global_pool=avg"]


@pytest.mark.parametrize("overrides, message", [
    (PACK, "data.packing needs .* set model.pos_embed=factorized model.class_token=false model.global_pool=avg"),
    (PACK + FACTORIZED + ["parallel.pipe=2"], "data.packing with parallel.pipe=2 is not supported.*set parallel.pipe=1"),
    (PACK + FACTORIZED + ["model.moe.blocks=1"], "data.packing with model.moe is not supported"),
    (["data.packing.seq_len=8"] + FACTORIZED, "data.packing.seq_len=8 cannot hold one 64 px image .*seq_len >= 16"),
    (["model.moe.blocks=1", "model.parallel_block=true"], "moe_blocks and parallel_block cannot be combined"),
    (["model.bias=false", "model.qkv_bias=true"], "model.bias=false drops the QKV biases but model.qkv_bias=true"),
    (["model.moe.blocks=9"], "moe_blocks=9 must be between 0 and depth=8"),
    (["model.parallel_block=true", "parallel.tensor=3"], "parallel.tensor=3 must divide the 4 attention heads"),
    (["train.loss=softmaxx"], "train.loss='softmaxx' is not allowed; choose one of 'softmax', 'sigmoid'"),
])
def test_bad_combinations_fail_early_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(TINY, overrides)


def test_clip_refuses_the_vit_options_naming_them():
    with pytest.raises(ConfigError, match="model.parallel_block is a ViT option"):
        load_experiment(ROOT / "configs" / "clip_tiny.yaml", ["model.parallel_block=true"])
