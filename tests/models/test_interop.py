"""Resharding and library interop: merging tensor-parallel shards is the exact inverse of
``shard()``, pipeline layers map back to whole-model names, ``shard_state_dict`` gives each
piece what its own initialisation gives it, and the results load into timm / open_clip."""
import logging

import open_clip
import pytest
import timm
import torch
from torch import nn

from vitscale.models import create_model
from vitscale.models.clip import clip_init_weights, to_open_clip_state_dict
from vitscale.models.interop import (check_state_dict, convert_state_dict, library_config, merge_tensor_parallel,
                                     pipeline_to_whole, shard_state_dict, timm_kwargs)
from vitscale.models.tensor_parallel import ColumnParallelLinear, RowParallelLinear, parallelize_vit
from vitscale.models.vit import init_weights

VIT = dict(img_size=32, depth=2, num_heads=4, num_classes=5, qk_norm=True, init_values=0.1)
SEED = 11


def _vit(rank: int = 0, world: int = 1, **kw):
    """The ViT (or its tensor shard ``rank`` of ``world``) as ``models.parallelize.parallelize`` makes it."""
    with torch.device("meta"):
        model = create_model("vit_tiny_patch16", **{**VIT, **kw})
    parallelize_vit(model, rank, world, None)
    model.to_empty(device="cpu")
    return init_weights(model, SEED)


def _clip(rank: int = 0, world: int = 1):
    with torch.device("meta"):
        model = create_model("clip_tiny")
    parallelize_vit(model, rank, world, None)
    model.to_empty(device="cpu")
    return clip_init_weights(model, model.cfg, SEED)


def _assert_equal_dicts(got: dict, ref: dict):
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("world", [2, 4])
def test_column_and_row_merges_invert_shard(world, chunks):
    full_w, full_b = torch.randn(24 * chunks, 8), torch.randn(24 * chunks)
    cols = [ColumnParallelLinear(8, 24 * chunks, True, r, world, None, chunks=chunks, device="meta")
            for r in range(world)]
    shards = [{"weight": c.shard("weight", full_w), "bias": c.shard("bias", full_b)} for c in cols]
    merged = merge_tensor_parallel(shards, cols[0])
    assert torch.equal(merged["weight"], full_w) and torch.equal(merged["bias"], full_b)

    full_w, full_b = torch.randn(8, 24), torch.randn(8)
    rows = [RowParallelLinear(24, 8, True, r, world, None, device="meta") for r in range(world)]
    merged = merge_tensor_parallel([{"weight": r.shard("weight", full_w), "bias": full_b} for r in rows], rows[0])
    assert torch.equal(merged["weight"], full_w) and torch.equal(merged["bias"], full_b)


def test_qkv_shards_hold_heads_of_q_k_and_v():
    # Rows of qkv: (q, k, v) x 4 heads x 2 dims; rank 1 of 2 holds heads 2-3 of each.
    col = ColumnParallelLinear(1, 24, False, 1, 2, None, chunks=3, device="meta")
    rows = col.shard("weight", torch.arange(24.0)[:, None]).flatten().tolist()
    assert rows == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]


@pytest.mark.parametrize("world", [2, 4])
def test_vit_tensor_shards_merge_to_the_whole_model(world):
    whole = _vit().state_dict()
    shards = [_vit(r, world).state_dict() for r in range(world)]
    with torch.device("meta"):
        structure = parallelize_vit(create_model("vit_tiny_patch16", **VIT), 0, world, None)
    _assert_equal_dicts(merge_tensor_parallel(shards, structure), whole)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_block_shards_merge_to_the_whole_model_and_back(world):
    # The ViT-22B block: fused in_proj (MLP hidden, q, k, v) split per block, fused out_proj
    # (attention, MLP hidden) split per block, and timm's separate mlp_bias split with the MLP.
    options = dict(parallel_block=True, qkv_bias=False, norm_bias=False, dual_patchnorm=True)
    whole = _vit(**options).state_dict()
    shards = [_vit(r, world, **options) for r in range(world)]
    with torch.device("meta"):
        structure = parallelize_vit(create_model("vit_tiny_patch16", **{**VIT, **options}), 0, world, None)
    _assert_equal_dicts(merge_tensor_parallel([s.state_dict() for s in shards], structure), whole)
    for shard in shards:
        _assert_equal_dicts(shard_state_dict(whole, shard), shard.state_dict())
    assert shards[1].blocks[0].mlp_bias.shape == (4 * 192 // world,)


def test_merge_refuses_a_wrong_number_of_shards():
    shards = [_vit(r, 2).state_dict() for r in range(2)]
    with torch.device("meta"):
        structure = parallelize_vit(create_model("vit_tiny_patch16", **VIT), 0, 4, None)
    with pytest.raises(ValueError, match="sharded over 4 tensor ranks but 2"):
        merge_tensor_parallel(shards, structure)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shard_state_dict_gives_each_shard_what_shard_gives(world):
    whole = _vit().state_dict()
    for rank in range(world):
        model = _vit(rank, world)
        _assert_equal_dicts(shard_state_dict(whole, model), model.state_dict())
        model.load_state_dict(shard_state_dict(whole, model), strict=True)


class _Stage(nn.Module):
    """Named like a ``deepspeed.pipe.PipelineModule`` stage: children are the global layer indices."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)


@pytest.mark.parametrize("world", [1, 2])
def test_pipeline_layers_map_to_whole_model_names_and_back(world):
    from vitscale.models.pipeline import vit_layers

    whole = _vit().state_dict()
    for rank in range(world):
        sharded = _vit(rank, world)
        named = vit_layers(sharded)
        prefixes = [p for p, _ in named]
        # What DeepSpeed writes: one state dict per layer, keys relative to the layer.
        files = {i: layer.state_dict() for i, (_, layer) in enumerate(named)}
        _assert_equal_dicts(pipeline_to_whole(files, prefixes), sharded.state_dict())
        for i, (prefix, layer) in enumerate(named):  # one layer, and a stage of the last two
            _assert_equal_dicts(shard_state_dict(whole, layer, prefix), files[i])
        stage = _Stage({i: named[i][1] for i in (len(named) - 2, len(named) - 1)})
        got = shard_state_dict(whole, stage, layer_prefixes=prefixes)
        _assert_equal_dicts(got, stage.state_dict())


def test_vit_state_dict_loads_into_timm_and_computes_the_same():
    model = _vit(qk_norm=False, init_values=None, global_pool="avg").eval()
    ref = timm.models.vision_transformer.VisionTransformer(**library_config(model, "timm")).eval()
    ref.load_state_dict(convert_state_dict(model.state_dict(), "timm"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), rtol=1e-5, atol=1e-5)
    assert timm_kwargs(model.cfg)["global_pool"] == "avg"


def test_formats_refuse_the_other_family():
    with pytest.raises(ValueError, match="not a ViT"):
        convert_state_dict(_clip().state_dict(), "timm")
    with pytest.raises(ValueError, match="not a CLIP"):
        convert_state_dict(_vit().state_dict(), "open_clip")
    with pytest.raises(ValueError, match="unknown export format"):
        convert_state_dict(_vit().state_dict(), "onnx")
    with pytest.raises(ValueError, match="missing"):
        check_state_dict({}, _vit())


@pytest.fixture
def quiet_open_clip(caplog):
    caplog.set_level(logging.ERROR)  # open_clip warns at every random build


def test_clip_tensor_shards_merge_and_load_into_open_clip(quiet_open_clip):
    whole_model = _clip().eval()
    whole = whole_model.state_dict()
    shards = [_clip(r, 2) for r in range(2)]
    with torch.device("meta"):
        structure = parallelize_vit(create_model("clip_tiny"), 0, 2, None)
    merged = merge_tensor_parallel([s.state_dict() for s in shards], structure)
    _assert_equal_dicts(merged, whole)
    for rank, shard in enumerate(shards):  # and back
        _assert_equal_dicts(shard_state_dict(merged, shard), shard.state_dict())

    ref = open_clip.model.CLIP(**library_config(whole_model, "open_clip")).eval()
    ref.load_state_dict(convert_state_dict(merged, "open_clip"), strict=True)
    assert convert_state_dict(merged, "open_clip").keys() == to_open_clip_state_dict(whole).keys()
    cfg = whole_model.cfg
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (2, cfg.text.context_length))
    tokens[:, 5], tokens[:, 6:] = cfg.text.vocab_size - 1, 0
    with torch.no_grad():
        for got, want in zip(ref(images, tokens), whole_model(images, tokens)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clip_pipeline_layers_map_to_whole_model_names():
    from vitscale.models import pipeline
    for rank in range(2):
        sharded = _clip(rank, 2)
        reference = sharded.state_dict()
        named = pipeline.clip_layers(sharded)
        files = {i: layer.state_dict() for i, (_, layer) in enumerate(named)}
        _assert_equal_dicts(pipeline_to_whole(files, [p for p, _ in named]), reference)
