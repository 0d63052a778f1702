"""Analytic FLOPs against torch's own FLOP counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.models import create_model
from vitscale.models.flops import forward_flops, train_flops
from vitscale.models.vit import vit_config


def counted_forward_flops(model, img):
    # The MATH backend runs attention as two matmuls the counter sees. The counter does
    # have formulas for the fused flash / efficient / cuDNN SDPA ops, but CPU's fused
    # kernel (_scaled_dot_product_flash_attention_for_cpu) is not among them, so with the
    # default backend Q K^T and A V would go uncounted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img, img))
    return counter.get_total_flops()


@pytest.mark.parametrize("name, img, options", [
    ("vit_tiny_patch16", 64, dict(depth=2, num_heads=4)),
    ("vit_small_patch14", 56, dict(depth=1)),
    ("vit_base_patch32", 64, dict(depth=1, global_pool="avg", class_token=False)),
    ("vit_tiny_patch16", 224, dict(depth=2, qk_norm=True, init_values=0.1)),  # ViT-Ti/16's 197 tokens
])
def test_forward_flops_equal_torch_flop_counter(name, img, options):
    # Exact: both count 2 FLOPs per multiply-add of the matmuls/convolutions and nothing else.
    model = create_model(name, img_size=img, num_classes=10, **options).eval()
    assert forward_flops(model) == counted_forward_flops(model, img)
    assert forward_flops(model) == forward_flops(model.cfg)


def test_vit_base_is_about_35_gflops_per_image():
    # The quoted figure for ViT-B/16 at 224 px is ~17.6 GMACs, i.e. ~35 GFLOPs.
    assert 34e9 < forward_flops(vit_config("base", 16)) < 36e9


def test_flops_grow_linearly_with_depth():
    one, two = forward_flops(vit_config("tiny", 16, depth=1)), forward_flops(vit_config("tiny", 16, depth=2))
    assert forward_flops(vit_config("tiny", 16, depth=12)) == one + 11 * (two - one)


def test_train_flops_are_three_or_four_forwards():
    cfg = vit_config("tiny", 16, img_size=32)
    assert train_flops(cfg) == 3 * forward_flops(cfg)
    assert train_flops(cfg, recompute=True) == 4 * forward_flops(cfg)


def test_unknown_model_family_is_a_clear_error():
    with pytest.raises(TypeError, match="no FLOP formula for Linear: pass one of ViTConfig"):
        forward_flops(torch.nn.Linear(2, 2))
