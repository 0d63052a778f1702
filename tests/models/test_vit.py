"""The ViT zoo: every registered model builds and trains; weights are timm's, key for key."""
from pathlib import Path

import pytest
import timm
import torch

from vitscale.models import create_model, list_models
from vitscale.models.vit import VIT_PATCHES, VIT_SIZES, vit_config

PKG = Path(__file__).resolve().parents[2] / "vitscale" / "models"


SIZED = [n for n in list_models("vit_*") if n != "vit_22b_patch14"]


def test_registry_has_every_size_and_patch():
    assert len(SIZED) == len(VIT_SIZES) * len(VIT_PATCHES)
    for name in ["vit_tiny_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]:
        assert name in list_models()
    assert list_models("vit_*_patch14") == sorted([f"vit_{s}_patch14" for s in VIT_SIZES] + ["vit_22b_patch14"])
    assert list_models() == sorted(list_models())


def test_vit_22b_shape():
    with torch.device("meta"):
        model = create_model("vit_22b_patch14")
    assert (model.cfg.embed_dim, model.cfg.depth, model.cfg.num_heads, model.cfg.mlp_hidden) == (6144, 48, 48, 24576)
    assert model.cfg.qk_norm and not model.cfg.qkv_bias
    n = sum(p.numel() for p in model.parameters())
    assert 21.7e9 < n < 21.8e9, n  # the paper's 21.743B, less its bias-free norms, plus our biases


@pytest.mark.parametrize("name", SIZED)
def test_each_model_builds_and_trains(name):
    # The size's full width and heads; one block and a 2x2 patch grid keep it fast.
    patch = int(name.rsplit("patch", 1)[1])
    model = create_model(name, img_size=2 * patch, num_classes=5, depth=1)
    width, _, heads = VIT_SIZES[name.split("_")[1]]
    assert model.cfg.embed_dim == width and model.cfg.patch_size == patch
    assert model.blocks[0].attn.num_heads == heads and model.blocks[0].mlp.fc1.out_features == 4 * width
    x = torch.randn(2, 3, 2 * patch, 2 * patch)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("timm_name, ours, options", [
    ("vit_tiny_patch16_224", "vit_tiny_patch16", dict(depth=4, num_heads=4)),
    ("vit_small_patch32_224", "vit_small_patch32",
     dict(depth=2, qk_norm=True, init_values=1e-2, global_pool="avg")),
    ("vit_base_patch32_224", "vit_base_patch32", dict(depth=1, class_token=False, global_pool="avg", fc_norm=False)),
])
def test_state_dict_loads_into_timm_and_gives_the_same_outputs(timm_name, ours, options):
    torch.manual_seed(0)
    kwargs = dict(img_size=64, num_classes=10, **options)
    model = create_model(ours, **kwargs).eval()
    ref = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    # and back: timm's weights into ours
    torch.manual_seed(1)
    ref2 = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    model.load_state_dict(ref2.state_dict(), strict=True)
    torch.testing.assert_close(model(x), ref2(x), rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights():
    def build(seed):
        torch.manual_seed(seed)
        return create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2, init_values=0.1).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_init_statistics_are_timms():
    torch.manual_seed(0)
    model = create_model("vit_base_patch16", img_size=32, depth=1, init_values=1e-5)
    assert abs(model.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 1e-3
    assert abs(model.pos_embed.std().item() - 0.02) < 2e-3
    assert model.cls_token.abs().max().item() < 1e-4
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)


def test_drop_path_is_linear_over_blocks_and_everything_is_off_in_eval():
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=5, drop_path_rate=0.2,
                         drop_rate=0.1, attn_drop_rate=0.1)
    assert [b.drop_path1.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(model(x), model(x))  # training: random
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_fc_norm_follows_timms_rule_unless_set():
    token = create_model("vit_tiny_patch16", img_size=32, depth=1)
    avg = create_model("vit_tiny_patch16", img_size=32, depth=1, global_pool="avg")
    avg_no_fc = create_model("vit_tiny_patch16", img_size=32, depth=1, global_pool="avg", fc_norm=False)
    assert "norm.weight" in token.state_dict() and "fc_norm.weight" not in token.state_dict()
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()
    assert "norm.weight" in avg_no_fc.state_dict() and "fc_norm.weight" not in avg_no_fc.state_dict()


def test_patch_size_can_be_overridden():
    # config.py passes model.patch_size through to the registered builder.
    model = create_model("vit_tiny_patch16", img_size=32, patch_size=8, num_classes=3, depth=1)
    assert model.cfg.patch_size == 8 and model.patch_embed.proj.kernel_size == (8, 8)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_pieces_compose_to_forward():
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.embed(x)
    assert tokens.shape == (2, 5, 192)  # 2x2 patches + class token
    torch.testing.assert_close(model.forward_head(model.norm(model.blocks(tokens))), model(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=50), "img_size=50 must be divisible by patch_size=16; use e.g. img_size=48"),
    (dict(num_heads=5), "embed_dim=192 must be divisible by num_heads=5; use num_heads in [1, 2, 3, 4, 6,"),
    (dict(class_token=False), "global_pool='token' needs class_token=True"),
    (dict(depht=3), "unknown ViT option(s) ['depht']; valid options: "),
    (dict(drop_path_rate=1.0), "drop_path_rate=1.0 must be in [0, 1)"),
    (dict(patch_size=0), "patch_size=0 must be a positive integer"),
])
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError) as e:
        create_model("vit_tiny_patch16", **kwargs)
    assert message in str(e.value)


def test_unknown_override_lists_the_valid_fields():
    with pytest.raises(ValueError, match="valid options: .*depth.*drop_path_rate"):
        vit_config("tiny", 16, layers=3)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("vit_tiny_patch16", img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"built with img_size=32; resize the input or build with img_size=64"):
        model(torch.randn(1, 3, 64, 64))


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"unknown model 'vit_base_patch61'; did you mean vit_base_patch16.*list_models\(\)"):
        create_model("vit_base_patch61")


def test_models_know_nothing_of_distribution_training_or_data():
    # Model definitions stay plain torch; only the functions that apply parallelism to a
    # built model (tensor_parallel.py, pipeline.py, parallelize.py), the losses that gather
    # over the data-parallel group (losses.py) and the weight masks ranked over a tensor-sharded
    # matrix (sparsity.py, applied to a built model) may use torch.distributed / deepspeed.
    files = sorted(PKG.glob("*.py"))
    assert {"vit.py", "flops.py", "__init__.py", "tensor_parallel.py", "pipeline.py"} <= {p.name for p in files}
    for path in files:
        text = path.read_text()
        banned = ["vitscale.train", "vitscale.data"]
        if path.name not in ("tensor_parallel.py", "pipeline.py", "parallelize.py", "losses.py", "sparsity.py"):
            banned += ["torch.distributed", "deepspeed"]
        for word in banned:
            assert word not in text, f"{path.name} mentions {word}"
