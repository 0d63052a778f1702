"""Analytic FLOPs against torch's own FLOP counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.models import create_model
from vitscale.models.flops import forward_flops, train_flops


def counted_forward_flops(model, img):
    # The MATH backend runs attention as matmuls the counter sees; the CPU flash
    # kernel is not registered with FlopCounterMode (it would miss Q K^T and A V).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img, img))
    return counter.get_total_flops()


@pytest.mark.parametrize("name, img, options", [
    ("vit_tiny_patch16", 64, dict(depth=2, num_heads=4)),
    ("vit_small_patch14", 56, dict(depth=1)),
    ("vit_base_patch32", 64, dict(depth=1, global_pool="avg", class_token=False)),
    ("vit_tiny_patch16", 224, dict(depth=12)),  # the real ViT-Ti/16
])
def test_forward_flops_equal_torch_flop_counter(name, img, options):
    model = create_model(name, img_size=img, num_classes=10, **options).eval()
    assert forward_flops(model) == counted_forward_flops(model, img)


def test_vit_base_is_about_17_gflops_per_image():
    # The commonly quoted figure for ViT-B/16 at 224 px: 17.6 GMACs-ish, i.e. ~35 GFLOPs.
    cfg = create_model("vit_base_patch16", img_size=224, depth=1).cfg
    cfg.depth = 12
    assert 34e9 < forward_flops(cfg) < 36e9


def test_train_flops_are_three_or_four_forwards():
    cfg = create_model("vit_tiny_patch16", img_size=32, depth=1).cfg
    assert train_flops(cfg) == 3 * forward_flops(cfg)
    assert train_flops(cfg, recompute=True) == 4 * forward_flops(cfg)


def test_unknown_model_family_is_a_clear_error():
    with pytest.raises(TypeError, match="no FLOP formula for Linear"):
        forward_flops(torch.nn.Linear(2, 2))
