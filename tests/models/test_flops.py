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


def _count(fn, *args):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


@pytest.mark.parametrize("options", [dict(depth=3, num_heads=4), dict(depth=3, num_heads=4, moe_blocks=1)])
def test_vit_layer_flops_equal_torch_flop_counter_per_pipeline_layer(options):
    # Each pipeline layer (embedding, blocks, head) run on its own under torch's counter: the
    # per-layer figures a pipeline stage's share is made of (throughput.py) match it layer by layer.
    from vitscale.models.flops import layer_flops
    from vitscale.models.pipeline import vit_layers

    model = create_model("vit_tiny_patch16", img_size=64, num_classes=10, **options).eval()
    counted = []
    with torch.no_grad():
        x = (torch.randn(2, 3, 64, 64), None)
        for prefix, layer in vit_layers(model):
            if prefix.startswith("blocks."):
                y, flops = _count(layer, x[0])
                x = (y, None)
            else:
                x, flops = _count(layer, x)
            counted.append(flops // 2)  # a batch of 2
    assert layer_flops(model) == counted
    assert sum(counted) == forward_flops(model)


def test_clip_layer_flops_equal_torch_flop_counter_per_pipeline_layer():
    from vitscale.models.flops import layer_flops
    from vitscale.models.pipeline import clip_layers

    from vitscale.models.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    cfg = CLIPConfig(embed_dim=32, vision=CLIPVisionConfig(image_size=32, patch_size=8, width=64, layers=2,
                                                           head_width=16),
                     text=CLIPTextConfig(context_length=12, vocab_size=100, width=48, heads=4, layers=3))
    model = CLIP(cfg).eval()
    counted = []
    with torch.no_grad():
        x = (torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 12)))
        for _, layer in clip_layers(model):
            x, flops = _count(layer, x)
            counted.append(flops // 2)
    assert layer_flops(model) == counted
    assert sum(counted) == forward_flops(model)


def test_stage_flops_of_vit_22b_one_stage_per_node():
    # configs/vit_22b.yaml: 48 blocks over 8 stages ('blocks' partition), 6 blocks each; the embedding rides
    # with stage 0, the head with stage 7. Hand figures: a parallel block on N = 257 tokens of width
    # D = 6144, MLP 24576: qkv 2*N*D*3D + scores 2*N*N*D + values 2*N*N*D + proj 2*N*D*D + fc1, fc2 2*N*D*4D each.
    from pathlib import Path

    from vitscale.experiment import load_experiment
    from vitscale.models.parallelize import stage_flops

    exp = load_experiment(Path(__file__).parents[2] / "configs/vit_22b.yaml", [])
    n, d = 257, 6144  # 224 / 14 = 16 x 16 patches + the class token
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * 4 * d
    embed = 2 * 256 * (3 * 14 * 14) * d
    head = 2 * d * 1000
    assert stage_flops(exp.model, 8, "blocks") == [embed + 6 * block] + [6 * block] * 6 + [6 * block + head]
    assert stage_flops(exp.model, 1) == [exp.model.forward_flops()] == [embed + 48 * block + head]
