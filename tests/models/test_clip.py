"""CLIP: every size is open_clip's, key for key; weights move both ways and compute the same."""
import logging
import math

import open_clip
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.models import create_model, list_models
from vitscale.models.clip import (CLIP_SIZES, LOGIT_SCALE_MAX, OPEN_CLIP_NAMES, CLIPBlock, CLIPConfig, clip_config,
                                  clip_init_weights, from_open_clip_state_dict, to_open_clip_state_dict)
from vitscale.models.flops import forward_flops, train_flops
from vitscale.models.tensor_parallel import ColumnParallelLinear, RowParallelLinear, parallelize_vit
from vitscale.models.vit import Block

# The tiny size at two variants: GELU (open_clip's own configs) and QuickGELU (OpenAI's weights).
TINY = [dict(), dict(quick_gelu=True, vision=dict(layers=1), text=dict(context_length=12, layers=3))]


@pytest.fixture(autouse=True)
def quiet_open_clip(caplog):
    # open_clip warns at every random build that no pretrained weights were loaded.
    caplog.set_level(logging.ERROR)


def _open_clip_twin(cfg: CLIPConfig) -> torch.nn.Module:
    # open_clip's CLIP class from the same config data, as its factory does from the JSON.
    return open_clip.model.CLIP(**cfg.to_dict()).eval()


def _batch(cfg: CLIPConfig, batch: int = 3, seed: int = 0):
    """Random images and captions: ids below the vocabulary's top, then the largest id (EOT,
    as OpenAI's tokenizer) at a different position per row, zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    n, vocab = cfg.text.context_length, cfg.text.vocab_size
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = torch.randint(1, vocab - 1, (batch, n), generator=g)
    for row, eot in enumerate(torch.randint(2, n, (batch,), generator=g).tolist()):
        tokens[row, eot], tokens[row, eot + 1:] = vocab - 1, 0
    return images, tokens


def test_registry_has_every_size():
    assert list_models("clip_*") == sorted(CLIP_SIZES)
    assert set(OPEN_CLIP_NAMES) == set(CLIP_SIZES) - {"clip_tiny"}


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_NAMES))
def test_each_size_is_open_clips_parameter_for_parameter(name):
    # Both built on the meta device from open_clip's own config of the name: no memory, so
    # even ViT-g/14 (1.4B parameters) is instant. (open_clip.create_model(..., device="meta")
    # builds on the CPU first and moves: 10 s and 5 GB for ViT-g; see the next test.)
    oc_cfg = open_clip.get_model_config(OPEN_CLIP_NAMES[name])
    assert clip_config(name) == CLIPConfig.from_dict(oc_cfg)
    with torch.device("meta"):
        model = create_model(name)
        ref = open_clip.model.CLIP(**oc_cfg)
    ours = {k: tuple(v.shape) for k, v in to_open_clip_state_dict(model.state_dict()).items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: tuple(v.shape) for k, v in from_open_clip_state_dict(ref.state_dict()).items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = model.cfg
    assert (cfg.text.context_length, cfg.text.vocab_size, cfg.vision.image_size) == (77, 49408, 224)
    assert not cfg.quick_gelu  # open_clip's configs without '-quickgelu' use nn.GELU


def test_open_clips_factory_builds_the_same_keys():
    ref = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")
    assert type(ref) is open_clip.model.CLIP
    with torch.device("meta"):
        model = create_model("clip_vit_b32")
    assert sorted(to_open_clip_state_dict(model.state_dict())) == sorted(ref.state_dict())


def test_mapping_renames_only_and_round_trips():
    model = create_model("clip_tiny")
    sd = model.state_dict()
    oc = to_open_clip_state_dict(sd)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in oc
    assert "transformer.resblocks.0.mlp.c_proj.bias" in oc
    assert "token_embedding.weight" in oc and "text_projection" in oc and "visual.proj" in oc
    assert oc["visual.transformer.resblocks.1.attn.in_proj_weight"] is sd["visual.blocks.1.attn.qkv.weight"]
    assert oc["logit_scale"].shape == () and sd["logit_scale"].shape == (1,)  # DeepSpeed needs >= 1-d
    back = from_open_clip_state_dict(oc)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd if k != "logit_scale")
    assert back["logit_scale"].shape == (1,) and back["logit_scale"].data_ptr() == sd["logit_scale"].data_ptr()


@pytest.mark.parametrize("options", TINY)
def test_weights_move_both_ways_and_compute_what_open_clip_computes(options):
    torch.manual_seed(0)
    model = create_model("clip_tiny", **options).eval()
    ref = _open_clip_twin(model.cfg)
    ref.load_state_dict(to_open_clip_state_dict(model.state_dict()), strict=True)
    images, tokens = _batch(model.cfg)
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), **close)
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens), **close)
        for a, b in zip(model(images, tokens), ref(images, tokens)):
            torch.testing.assert_close(a, b, **close)
    # and back: open_clip's (differently initialised) weights into ours
    torch.manual_seed(1)
    ref2 = _open_clip_twin(model.cfg)
    model.load_state_dict(from_open_clip_state_dict(ref2.state_dict()), strict=True)
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        img2, txt2, scale2 = ref2(images, tokens)
        torch.testing.assert_close(img @ txt.T * scale, img2 @ txt2.T * scale2, **close)  # the logits


def test_quick_gelu_is_what_the_option_says():
    gelu, quick = create_model("clip_tiny"), create_model("clip_tiny", quick_gelu=True)
    assert isinstance(gelu.text.blocks[0].mlp.act, torch.nn.GELU)
    assert type(quick.visual.blocks[0].mlp.act).__name__ == "QuickGELU"


def test_text_attention_is_causal_and_pooled_at_the_eot_token():
    model = create_model("clip_tiny").eval()
    _, tokens = _batch(model.cfg, batch=2)
    changed = tokens.clone()
    changed[:, 9] = 5  # a later token changes ...
    with torch.no_grad():
        a = model.text.blocks(model.text.embed(tokens))
        b = model.text.blocks(model.text.embed(changed))
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)  # ... nothing before it
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    # The image tower is not causal: the last patch moves the class token.
    images, _ = _batch(model.cfg, batch=1)
    edited = images.clone()
    edited[..., -8:, -8:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), model.encode_image(edited))
    # EOT pooling: the embedding depends only on the tokens up to the largest id.
    eot = [5, 11]
    tokens = torch.randint(1, 900, (2, model.cfg.text.context_length))
    for row, pos in enumerate(eot):
        tokens[row, pos] = 999
    assert model.text.eot_positions(tokens).tolist() == eot
    after = tokens.clone()
    after[0, 6:], after[1, 12:] = 7, 3  # anything after EOT
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(after), rtol=0, atol=1e-6)
        # and a caption cut right after its EOT computes the same (positions are causal)
        torch.testing.assert_close(model.encode_text(tokens[:1, :6]), model.encode_text(tokens)[:1], rtol=1e-5,
                                   atol=1e-6)


def test_logit_scale_starts_at_log_1_over_007_and_clamps_at_log_100():
    model = create_model("clip_tiny")
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    _, _, scale = model(*_batch(model.cfg))
    assert scale.item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX) and model(*_batch(model.cfg))[2].item() \
        == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0
    assert create_model("clip_tiny", init_logit_scale=0.0).logit_scale.item() == 0.0


def test_logit_scale_is_declared_clamped_for_the_trainer():
    # The trainer reads the bounds from the model (ModelSpec.clamped) and clamps after each step.
    assert create_model("clip_tiny").clamped_parameters() == {"logit_scale": (0.0, LOGIT_SCALE_MAX)}


def test_siglip_bias_is_open_clips_and_moves_both_ways():
    # init_logit_bias (open_clip's option; SigLIP: -10 with logit scale log 10): a learned
    # logit_bias, returned fourth as open_clip's forward does, converted to its 0-d scalar.
    torch.manual_seed(0)
    model = create_model("clip_tiny", init_logit_bias=-10.0, init_logit_scale=math.log(10)).eval()
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert "logit_bias" in model.no_weight_decay()
    assert create_model("clip_tiny").logit_bias is None and len(create_model("clip_tiny")(*_batch(model.cfg))) == 3
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)  # trained away from its init: the value itself must travel
    ref = _open_clip_twin(model.cfg)
    assert ref.logit_bias is not None and model.cfg.to_dict()["init_logit_bias"] == -10.0
    converted = to_open_clip_state_dict(model.state_dict())
    assert converted["logit_bias"].shape == ()
    ref.load_state_dict(converted, strict=True)
    images, tokens = _batch(model.cfg)
    with torch.no_grad():
        ours, theirs = model(images, tokens), ref(images, tokens)
        assert len(ours) == len(theirs) == 4
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(images, tokens)[3], torch.tensor(-7.5))
    back = from_open_clip_state_dict(ref.state_dict())
    assert back["logit_bias"].shape == (1,)
    model.load_state_dict(back, strict=True)
    # initialised by name, as every other parameter (pipeline stages, tensor shards)
    clip_init_weights(model, model.cfg, seed=0)
    assert model.logit_bias.item() == -10.0


def test_forward_returns_unit_features_and_trains():
    model = create_model("clip_tiny")
    img, txt, scale = model(*_batch(model.cfg))
    assert img.shape == txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    logits = scale * img @ txt.T
    target = torch.arange(3)
    loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = create_model("clip_tiny")
    b = create_model("clip_tiny")
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(1)
    batch = _batch(a.cfg)
    for m in (a, b):
        img, txt, scale = m(*batch)
        (scale * img @ txt.T).logsumexp(0).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_blocks_are_vit_blocks_with_the_names_tensor_parallelism_needs():
    model = create_model("clip_tiny")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 4 and all(isinstance(b, CLIPBlock) for b in blocks)
    for b in blocks:
        assert b.attn.num_heads == 4 and b.attn.qkv.out_features == 3 * 64 and b.mlp.fc1.out_features == 256
        assert b.norm1.eps == 1e-5  # open_clip's epsilon, not timm's 1e-6
    assert [b.attn.causal for b in model.visual.blocks] == [False, False]
    assert [b.attn.causal for b in model.text.blocks] == [True, True]


def test_tensor_parallel_shards_both_towers_and_initialises_slices_of_the_whole():
    # parallelize_vit, unchanged, finds every block of both towers (no process group is
    # needed to build and initialise the shards; their forward is test_tensor_parallel's).
    cfg = clip_config("clip_tiny")
    whole = clip_init_weights(create_model("clip_tiny"), cfg, seed=5).state_dict()
    for rank in range(2):
        with torch.device("meta"):
            model = create_model("clip_tiny")
        parallelize_vit(model, rank, 2, group=None)
        model.to_empty(device="cpu")
        shard = clip_init_weights(model, cfg, seed=5).state_dict()
        assert shard.keys() == whole.keys()
        for tower in ("visual", "text"):
            for b in range(2):
                blk = getattr(model, tower).blocks[b]
                assert isinstance(blk.attn.qkv, ColumnParallelLinear) and isinstance(blk.mlp.fc2, RowParallelLinear)
                assert blk.attn.num_heads == 2
                key = f"{tower}.blocks.{b}.attn.qkv.weight"  # rows (q, k, v) x heads: this rank's heads of each
                torch.testing.assert_close(shard[key], whole[key].reshape(3, 2, 32, 64)[:, rank].reshape(96, 64),
                                           rtol=0, atol=0)
                key = f"{tower}.blocks.{b}.mlp.fc2.weight"
                torch.testing.assert_close(shard[key], whole[key].chunk(2, dim=1)[rank], rtol=0, atol=0)
        assert torch.equal(shard["text.token_embedding.weight"], whole["text.token_embedding.weight"])
    assert [b.attn.causal for b in model.text.blocks] == [True, True]


def test_same_seed_same_weights_and_pieces_initialise_as_in_the_whole():
    def build(seed):
        torch.manual_seed(seed)
        return create_model("clip_tiny").state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text.blocks.0.attn.qkv.weight"], c["text.blocks.0.attn.qkv.weight"])
    # A piece initialised under its name in the whole model (a pipeline stage) gets the same values.
    cfg = clip_config("clip_tiny")
    whole = clip_init_weights(create_model("clip_tiny"), cfg, seed=3)
    piece = clip_init_weights(CLIPBlock(64, 4, 4.0, causal=True), cfg, seed=3, prefix="text.blocks.1")
    for k, v in piece.state_dict().items():
        assert torch.equal(v, whole.state_dict()[f"text.blocks.1.{k}"]), k


def test_init_statistics_follow_open_clip():
    torch.manual_seed(0)
    model = create_model("clip_vit_b32", vision=dict(layers=1), text=dict(layers=2))
    w = 512  # text width
    assert abs(model.text.token_embedding.weight.std().item() - 0.02) < 1e-3
    assert abs(model.text.positional_embedding.std().item() - 0.01) < 1e-3
    assert abs(model.text.blocks[0].attn.qkv.weight.std().item() - w**-0.5) < 1e-3
    assert abs(model.text.blocks[0].mlp.fc2.weight.std().item() - w**-0.5 * 4**-0.5) < 1e-3
    assert abs(model.visual.class_embedding.std().item() - 768**-0.5) < 5e-3
    assert abs(model.visual.proj.std().item() - 768**-0.5) < 1e-3
    assert torch.all(model.text.blocks[0].attn.qkv.bias == 0) and torch.all(model.visual.ln_post.weight == 1)


@pytest.mark.parametrize("options", [
    dict(),
    dict(embed_dim=24, vision=dict(image_size=48, patch_size=16, width=96, head_width=32, mlp_ratio=2.5),
         text=dict(context_length=20, width=48, heads=3, layers=1)),
])
def test_forward_flops_equal_torch_flop_counter(options):
    # As test_flops.py for the ViT: the MATH backend runs attention as matmuls the counter sees.
    model = create_model("clip_tiny", **options).eval()
    images, tokens = _batch(model.cfg, batch=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.encode_image(images), model.encode_text(tokens)
    assert forward_flops(model) == counter.get_total_flops() == forward_flops(model.cfg)
    assert train_flops(model) == 3 * forward_flops(model)


def test_clip_vit_b32_flops_are_its_towers():
    # By hand: the ViT-B/32 image tower at 224 px is ~4.4 GMACs (8.8 GFLOPs), the 12-block
    # 77-token text tower of width 512 ~3.0 GMACs: ~14.8 GFLOPs per image-caption pair.
    cfg = clip_config("clip_vit_b32")
    assert 14.5e9 < forward_flops(cfg) < 15.0e9
    assert 8.7e9 < forward_flops(cfg.vision.vit) < 8.9e9


@pytest.mark.parametrize("options, message", [
    (dict(vision=dict(image_size=50)), "vision.image_size=50 must be divisible by vision.patch_size=8; use e.g. "
                                       "vision.image_size=48"),
    (dict(text=dict(heads=5)), "text.width=64 must be divisible by text.heads=5; use text.heads in [1, 2, 4,"),
    (dict(vision=dict(layer=3)), "unknown CLIP option(s) ['vision.layer']; valid vision options: "),
    (dict(depth=3), "unknown CLIP option(s) ['clip.depth']; valid clip options: "),
    (dict(text=dict(width=0)), "text.width=0 must be a positive integer"),
    (dict(vision=3), "vision=3 must be a dict of vision tower fields"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError) as e:
        create_model("clip_tiny", **options)
    assert message in str(e.value)


def test_wrong_input_sizes_are_clear_errors():
    model = create_model("clip_tiny")
    with pytest.raises(ValueError, match=r"built with vision.image_size=32; resize the input"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"captions of 17 tokens exceed text.context_length=16"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


def test_config_reads_open_clips_json_layout():
    cfg = CLIPConfig.from_dict({"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768,
                                                                 "patch_size": 32},
                                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                             "layers": 12}})
    assert cfg == clip_config("clip_vit_b32")
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
