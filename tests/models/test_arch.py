"""Architecture options (ViT-22B recipe, Dual PatchNorm, Soft MoE, NaViT packing): each against a
direct reference computation on a tiny model, against timm where timm has the option, and
their FLOPs against torch's FLOP counter."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.data.packing import pack_sequences, batch_sequences
from vitscale.models import create_model
from vitscale.models.flops import forward_flops, packed_forward_flops
from vitscale.models.interop import create_timm_model, library_config, timm_kwargs
from vitscale.models.losses import sigmoid_cross_entropy
from vitscale.models.moe import SoftMoE
from vitscale.models.vit import Attention, ParallelBlock, vit_config

TINY = dict(img_size=32, num_classes=5, depth=2, num_heads=4)


def _vit(seed=0, **options):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16", **{**TINY, **options}).eval()


def _randomize(module, seed=1):
    # Non-trivial norms and biases, so that a formula that ignored them would fail.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _layer_norm(x, weight, bias, eps):
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return x * weight + (bias if bias is not None else 0)


def _attention(q, k, v):  # (B, heads, N, hd) -> (B, N, heads * hd), softmax(q k^T / sqrt(hd)) v
    a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (a @ v).transpose(1, 2).flatten(2)


def test_qk_norm_attention_equals_the_explicit_formula():
    attn = _randomize(Attention(16, 4, qkv_bias=True, qk_norm=True)).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    q = _layer_norm(q, attn.q_norm.weight, attn.q_norm.bias, 1e-6)  # per head, over head_dim
    k = _layer_norm(k, attn.k_norm.weight, attn.k_norm.bias, 1e-6)
    want = _attention(q, k, v) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_parallel_block_equals_the_explicit_formula(qkv_bias):
    cfg = vit_config("tiny", 16, embed_dim=16, num_heads=4, qk_norm=True, qkv_bias=qkv_bias, norm_bias=qkv_bias,
                     init_values=0.5)
    block = _randomize(ParallelBlock(cfg)).eval()
    assert (block.mlp_bias is None) == qkv_bias  # timm keeps the MLP bias apart when qkv has none
    x = torch.randn(2, 5, 16)
    y = _layer_norm(x, block.in_norm.weight, block.in_norm.bias, 1e-6)
    fused = y @ block.in_proj.weight.T + (block.in_proj.bias if qkv_bias else 0)
    h, q, k, v = fused.split([64, 16, 16, 16], dim=-1)
    h = h + (0 if qkv_bias else block.mlp_bias)
    heads = lambda t: t.reshape(2, 5, 4, 4).transpose(1, 2)  # noqa: E731
    q = _layer_norm(heads(q), block.q_norm.weight, block.q_norm.bias, 1e-6)
    k = _layer_norm(heads(k), block.k_norm.weight, block.k_norm.bias, 1e-6)
    # attention and MLP from the same normed input, through one output projection, summed into x
    out = torch.cat([_attention(q, k, heads(v)), F.gelu(h)], -1) @ block.out_proj.weight.T + block.out_proj.bias
    torch.testing.assert_close(block(x), x + block.ls.gamma * out, rtol=1e-5, atol=1e-6)


def test_bias_false_drops_qkv_and_every_layernorm_bias():
    keys = _vit(qkv_bias=False, norm_bias=False, qk_norm=True, parallel_block=True).state_dict()
    assert not [k for k in keys if "norm" in k and k.endswith(".bias")]
    assert "blocks.0.in_proj.bias" not in keys and "blocks.0.mlp_bias" in keys
    assert "blocks.0.out_proj.bias" in keys  # only QKV and norms lose their biases, as in ViT-22B


@pytest.mark.parametrize("options", [
    dict(qk_norm=True, parallel_block=True, qkv_bias=False, norm_bias=False),  # the ViT-22B recipe
    dict(parallel_block=True, init_values=0.1),
    dict(qk_norm=True, qkv_bias=False, norm_bias=False),
])
def test_options_timm_has_load_into_timm_with_the_same_outputs(options):
    model = _randomize(_vit(**options))
    kwargs = json.loads(json.dumps(library_config(model, "timm")))  # as the export writes it into the metadata
    ref = create_timm_model(kwargs).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=1e-5, atol=1e-5)
        theirs = _randomize(create_timm_model(timm_kwargs(model.cfg)).eval(), seed=2)  # and timm's into ours
        model.load_state_dict(theirs.state_dict(), strict=True)
        torch.testing.assert_close(model(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option, value", [("dual_patchnorm", True), ("moe_blocks", 1), ("pos_embed", "factorized")])
def test_options_timm_lacks_refuse_to_export_and_say_so(option, value):
    extra = dict(class_token=False, global_pool="avg") if option == "pos_embed" else {}
    with pytest.raises(ValueError, match=f"timm's VisionTransformer .*{option}.*--to vitscale"):
        timm_kwargs(_vit(**{option: value}, **extra).cfg)


def test_dual_patchnorm_equals_layernorm_before_and_after_the_patch_projection():
    model = _randomize(_vit(dual_patchnorm=True))
    pe = model.patch_embed
    x = torch.randn(2, 3, 32, 32)
    patches = F.unfold(x, kernel_size=16, stride=16).transpose(1, 2)  # (B, N, C*p*p) in (C, p, p) order
    y = _layer_norm(patches, pe.pre_norm.weight, pe.pre_norm.bias, 1e-6)
    y = y @ pe.proj.weight.flatten(1).T + pe.proj.bias
    want = _layer_norm(y, pe.norm.weight, pe.norm.bias, 1e-6)
    torch.testing.assert_close(pe(x), want, rtol=1e-5, atol=1e-5)
    assert pe.pre_norm.normalized_shape == (3 * 16 * 16,)


def test_soft_moe_equals_a_per_slot_loop():
    torch.manual_seed(0)
    experts, slots, dim, hidden, n = 3, 2, 8, 12, 5
    moe = SoftMoE(dim, hidden, experts, slots)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in moe.parameters():  # every value set here: the test must not read uninitialised memory
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        moe.phi.normal_(0, 1)  # a spread of affinities (LeCun-initialised phi is near uniform)
        moe.scale.fill_(3.0)
    x = torch.randn(2, n, dim)
    want = torch.zeros_like(x)
    for b in range(2):
        xn = x[b] / x[b].norm(dim=-1, keepdim=True)
        logits = torch.stack([moe.scale * xn @ (moe.phi[:, s] / moe.phi[:, s].norm()) for s in range(experts * slots)],
                             dim=1)  # (n, slots), one column per slot
        outs = []
        for s in range(experts * slots):
            dispatch = logits[:, s].softmax(0)  # a slot is a convex combination of all tokens
            slot_in = sum(dispatch[t] * x[b, t] for t in range(n))
            e = s // slots  # slot s belongs to expert s // slots
            h = F.gelu(moe.fc1_weight[e] @ slot_in + moe.fc1_bias[e])
            outs.append(moe.fc2_weight[e] @ h + moe.fc2_bias[e])
        for t in range(n):
            combine = logits[t].softmax(0)  # a token is a convex combination of all slot outputs
            want[b, t] = sum(combine[s] * outs[s] for s in range(experts * slots))
    torch.testing.assert_close(moe(x), want, rtol=1e-5, atol=1e-5)
    dispatch, combine = moe.weights(x)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(2, experts * slots))
    torch.testing.assert_close(combine.sum(2), torch.ones(2, n))


def test_moe_replaces_the_mlp_of_the_last_blocks_only():
    model = _vit(depth=3, moe_blocks=2, moe_experts=4, moe_slots=2)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "SoftMoE", "SoftMoE"]
    assert model.blocks[2].mlp.phi.shape == (192, 8)
    assert abs(model.blocks[2].mlp.phi.std().item() - 192**-0.5) < 0.01  # LeCun normal, as the paper


def _images():
    # Native aspect ratios and sizes, all within the model's 32 px bound (patch 8: grids 4x2, 1x4, 4x4, 2x2).
    gen = torch.Generator().manual_seed(5)
    sizes = [(32, 16), (8, 32), (32, 32), (16, 16)]
    return [((torch.rand(3, h, w, generator=gen) * 255).to(torch.uint8), i) for i, (h, w) in enumerate(sizes)]


PACKED = dict(img_size=32, patch_size=8, num_classes=5, depth=2, num_heads=4, pos_embed="factorized",
              class_token=False, global_pool="avg", dual_patchnorm=True, qk_norm=True)


def test_packed_attention_equals_each_image_alone():
    model = _randomize(_vit(**PACKED))
    images = _images()
    seqs = list(pack_sequences(images, patch_size=8, seq_len=24, max_images=3, max_size=32, seed=None))
    assert [s["labels"].tolist() for s in seqs] == [[0, 1, -1], [2, 3, -1]]  # greedy: 8 + 4 tokens, 16 + 4
    patches, coords, segments, labels = next(batch_sequences(seqs, 2))
    assert (segments == 0).sum() == 48 - 32  # padding in both sequences
    with torch.no_grad():
        packed = model(patches.float(), coords, segments)  # (2 sequences, 2 slots, classes)
        for image, label in images:
            alone = next(pack_sequences([(image, label)], patch_size=8, seq_len=16, max_images=1, max_size=32,
                                        seed=None))
            n = int((alone["segments"] > 0).sum())  # no padding at all: the image by itself
            want = model(alone["patches"][None, :n].float(), alone["coords"][None, :n], alone["segments"][None, :n])
            row, slot = [(r, s) for r in range(2) for s in range(2) if labels[r, s] == label][0]
            torch.testing.assert_close(packed[row, slot], want[0, 0], rtol=1e-4, atol=1e-5)
        # and a square full-size image packed alone equals the plain (unpacked) forward
        square = images[2][0].float()[None]
        torch.testing.assert_close(packed[1, 0], model(square)[0], rtol=1e-4, atol=1e-5)


def test_sigmoid_loss_is_the_binary_cross_entropy_summed_over_classes():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    p = logits.sigmoid()
    onehot = F.one_hot(labels, 3).float()
    want = -(onehot * p.log() + (1 - onehot) * (1 - p).log()).sum(1).mean()
    torch.testing.assert_close(sigmoid_cross_entropy(logits, labels), want)
    torch.testing.assert_close(sigmoid_cross_entropy(logits, onehot), want)  # multi-hot targets too


def _counted(model, *inputs):
    # MATH backend: the counter sees attention as two matmuls (see test_flops.py).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("options", [dict(parallel_block=True, qk_norm=True, qkv_bias=False, norm_bias=False),
                                     dict(moe_blocks=2, moe_experts=3, moe_slots=2), dict(dual_patchnorm=True)])
def test_flops_count_what_runs(options):
    model = _vit(**options)
    assert forward_flops(model) == _counted(model, torch.randn(1, 3, 32, 32))


def test_parallel_block_costs_the_flops_of_a_sequential_block():
    assert forward_flops(vit_config("base", 16, parallel_block=True)) == forward_flops(vit_config("base", 16))


def test_packed_flops_count_every_token_of_the_sequence():
    model = _vit(**PACKED)
    seq = next(pack_sequences(_images(), patch_size=8, seq_len=24, max_images=3, max_size=32, seed=None))
    seq["segments"][-1] = 3  # a third image slot in use, so the model pools max_images = 3 slots
    inputs = (seq["patches"][None].float(), seq["coords"][None], seq["segments"][None])
    assert packed_forward_flops(model.cfg, 24, 3) == _counted(model, *inputs)


CLIP_OPTIONS = dict(qk_norm=True, dual_patchnorm=True, moe_blocks=1, moe_experts=3, moe_slots=2)


def test_clip_image_tower_takes_the_options_counts_their_flops_and_open_clip_refuses_them():
    torch.manual_seed(0)
    model = create_model("clip_tiny", vision=CLIP_OPTIONS).eval()
    blocks = model.visual.blocks
    assert type(blocks[0].mlp).__name__ == "Mlp" and type(blocks[1].mlp).__name__ == "SoftMoE"
    assert model.visual.patch_norm_pre.normalized_shape == (3 * 8 * 8,)
    assert type(model.text.blocks[0].attn.q_norm).__name__ == "Identity"  # the image tower only
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(1, 999, (1, 16))
    assert forward_flops(model) == _counted(model, images, tokens)
    with pytest.raises(ValueError, match="open_clip's image tower has no qk_norm, dual_patchnorm, moe_blocks"):
        library_config(model, "open_clip")
    assert "qk_norm" not in create_model("clip_tiny").cfg.to_dict()["vision_cfg"]  # open_clip's JSON stays open_clip's
