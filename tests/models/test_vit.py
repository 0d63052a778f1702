"""The ViT zoo: every registered model builds and trains; weights are timm's, bit for bit."""
from pathlib import Path

import pytest
import timm
import torch

from vitscale.models import create_model, list_models
from vitscale.models.vit import VIT_PATCHES, VIT_SIZES

PKG = Path(__file__).resolve().parents[2] / "vitscale" / "models"


def test_registry_has_every_size_and_patch():
    assert len(list_models("vit_*")) == len(VIT_SIZES) * len(VIT_PATCHES)
    for name in ["vit_tiny_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]:
        assert name in list_models()
    assert list_models("vit_*_patch14") == sorted(f"vit_{s}_patch14" for s in VIT_SIZES)


@pytest.mark.parametrize("name", list_models())
def test_each_model_builds_and_trains(name):
    # Full width and heads of the size; one block and a 2x2 patch grid keep it fast.
    patch = int(name.rsplit("patch", 1)[1])
    model = create_model(name, img_size=2 * patch, num_classes=5, depth=1)
    width, _, heads = VIT_SIZES[name.split("_")[1]]
    assert model.cfg.embed_dim == width and model.blocks[0].attn.num_heads == heads
    x = torch.randn(2, 3, 2 * patch, 2 * patch)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("timm_name, ours, options", [
    ("vit_tiny_patch16_224", "vit_tiny_patch16", dict(depth=4, num_heads=4)),
    ("vit_small_patch32_224", "vit_small_patch32", dict(depth=2, qk_norm=True, init_values=1e-2, global_pool="avg")),
    ("vit_huge_patch14_224", "vit_huge_patch14", dict(depth=1)),
])
def test_state_dict_loads_into_timm_and_gives_the_same_outputs(timm_name, ours, options):
    torch.manual_seed(0)
    img = 56 if "patch14" in ours else 64
    model = create_model(ours, img_size=img, num_classes=7, **options).eval()
    kwargs = dict(img_size=img, num_classes=7, **options)
    ref = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, img, img)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    # and back: timm weights into ours
    torch.manual_seed(1)
    ref2 = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    model.load_state_dict(ref2.state_dict(), strict=True)
    torch.testing.assert_close(model(x), ref2(x), rtol=1e-5, atol=1e-5)


def test_same_seed_same_weights():
    torch.manual_seed(0)
    a = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2)
    torch.manual_seed(0)
    b = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_drop_path_is_linear_and_off_in_eval():
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=5, drop_path_rate=0.2)
    assert [b.drop_path1.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=50), "img_size=50 must be divisible by patch_size=16"),
    (dict(num_heads=5), "embed_dim=192 must be divisible by num_heads=5"),
    (dict(class_token=False), "global_pool='token' needs class_token=True"),
    (dict(depht=3), "unknown ViT option(s) ['depht']"),
])
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError) as e:
        create_model("vit_tiny_patch16", **kwargs)
    assert message in str(e.value)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ValueError, match="unknown model 'vit_base_patch61'; did you mean vit_base_patch16"):
        create_model("vit_base_patch61")


def test_models_know_nothing_of_distribution_training_or_data():
    for path in PKG.glob("*.py"):
        text = path.read_text()
        for banned in ("torch.distributed", "deepspeed", "vitscale.train", "vitscale.data"):
            assert banned not in text, f"{path.name} mentions {banned}"
