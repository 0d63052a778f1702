"""Config loading, overrides, DeepSpeed composition and every rejection with its message."""
import json
import re
from pathlib import Path

import pytest
import yaml

from vitscale.config import (ConfigError, Config, all_keys, compose_ds_config, load_config, parse_override,
                             validate_layout)
from vitscale.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def laion_sample(tmp_path_factory) -> Path:
    from vitscale.data.laion_sample import write_laion_sample

    out = tmp_path_factory.mktemp("laion")
    write_laion_sample(out, classes=2, instances=8, val_instances=2, size=16, shard_size=8)
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, laion_sample):
    # Image-text configs name data that lives on the cluster: point them at a sample set.
    uses_laion = yaml.safe_load(path.read_text())["data"].get("source") == "laion"
    cfg = load_experiment(path, [f"data.shards={laion_sample}/{{00000..00001}}.tar", f"eval.zeroshot={laion_sample}/val",
                                 f"eval.retrieval={laion_sample}/val"] if uses_laion else []).cfg
    ds = compose_ds_config(cfg, data_parallel=1, check_batch=False)
    assert ds["train_batch_size"] == cfg.train.global_batch
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero


def test_real_configs_follow_the_fdsl_recipe():
    base, large = load_config(ROOT / "configs/vit_base_fdsl.yaml"), load_config(ROOT / "configs/vit_large_fdsl.yaml")
    assert (base.model.name, base.train.global_batch, base.train.lr) == ("vit_base_patch16", 8192, 1e-3)
    assert (large.model.name, large.train.global_batch, large.train.lr) == ("vit_large_patch16", 2048, 5e-4)
    for cfg in (base, large):
        assert (cfg.data.image_size, cfg.train.precision, cfg.parallel.zero, cfg.optim.schedule) == (224, "bf16", 1, "cosine")
        assert cfg.optim.warmup_steps > 0


def test_tiny_config_can_split_over_tensor_and_pipe():
    cfg = load_config(ROOT / "configs/vit_tiny.yaml")
    assert cfg.model.num_heads % 4 == 0 and cfg.model.depth % 4 == 0 and cfg.data.image_size == 64


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    cfg = load_config(ROOT / "configs/vit_tiny.yaml",
                      ["train.steps=7", "train.lr=3e-4", "optim.betas=[0.9, 0.95]", "log.progress=false",
                       "run.dir=" + str(tmp_path), "train.steps=9", "model.init_values=1e-5"])
    assert cfg.train.steps == 9 and cfg.train.lr == pytest.approx(3e-4) and cfg.optim.betas == [0.9, 0.95]
    assert cfg.log.progress is False and cfg.run.dir == str(tmp_path) and cfg.model.init_values == 1e-5


def test_yaml_floats_in_exponent_form(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n")
    assert load_config(p).train.lr == pytest.approx(1e-4)


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("train.steps")


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("lr=1", "did you mean 'train.lr'"),
    ("optim.warmup=5", "did you mean 'optim.warmup_steps'"),
    ("train.steps=abc", "train.steps='abc' must be of type int"),
    ("train.steps=1.5", "train.steps=1.5 must be of type int"),
    ("train.lr=true", "must be a number, not a boolean"),
    ("train.precision=fp8", "train.precision='fp8' is not allowed; choose one of 'fp32', 'bf16', 'fp16'"),
    ("parallel.zero=4", "parallel.zero=4 is not allowed"),
    ("train.global_batch=33", "train.global_batch=33 must be a multiple of train.micro_batch=16"),
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("model.name=vit_tiny_patch61", "model.name='vit_tiny_patch61' is not a registered model; did you mean"),
    ("data.source=fractl", "data.source='fractl' is not available"),
    ("parallel.tensor=3", "parallel.tensor=3 must divide the 4 attention heads of vit_tiny_patch16; use one of 1, 2, 4"),
    ("parallel.pipe=9", "parallel.pipe=9 is more stages than the 8 blocks"),
    ("data.source=/no/such/shards/", "data.source: data.shards entry '/no/such/shards/'"),
    ("data.hflip=2", "data.hflip=2.0 must be a probability in [0, 1]"),
    ("model.name=clip_tiny", "model.depth is a ViT option; a CLIP states its towers in model.vision"),
    ("model.vision={x:1}", "model.vision / model.text configure CLIP towers; vit_tiny_patch16 is a ViT classifier"),
    ("parallel.pipe=4 model.depth=3", "parallel.pipe=4 is more stages than the 3 blocks"),
    ("parallel.tensor=2 model.mlp_ratio=4.01", "parallel.tensor=2 must divide the MLP width 769"),
    ("parallel.pipe=2 parallel.zero=3", "parallel.zero=3 cannot run with parallel.pipe=2"),
    ("parallel.partition=layers", "parallel.partition='layers' is not allowed; choose one of 'blocks'"),
    ("parallel.activation_checkpoint=-1", "parallel.activation_checkpoint=-1 must be >= 0"),
    ("parallel.offload=all", "parallel.offload=all offloads parameters, which only ZeRO-3 does"),
    ("parallel.zero=0 parallel.offload=optimizer", "parallel.offload=optimizer needs ZeRO 1, 2 or 3"),
    ("train.precision=bf16 parallel.zero=0", "train.precision=bf16 needs parallel.zero >= 1 (now parallel.zero=0): "
                                             "DeepSpeed accumulates bf16 gradients in fp32 only with ZeRO; set "
                                             "parallel.zero=1"),
    ("train.precision=bf16 parallel.zero=0 parallel.pipe=2", "train.precision=bf16 needs parallel.zero >= 1"),
    ("train.grad_comm_dtype=bf16", "train.grad_comm_dtype=bf16 applies to train.precision=bf16 only (now "
                                   "train.precision=fp32); remove it or set train.precision=bf16"),
    ("train.grad_comm_dtype=fp16", "train.grad_comm_dtype='fp16' is not allowed; choose one of 'fp32', 'bf16'"),
    ("parallel.ds_preset=zero9", "parallel.ds_preset='zero9' not found; choose one of"),
    ("parallel.ds_preset=zero3", "parallel.zero=1 but DeepSpeed preset zero3.json is for ZeRO stage 3"),
    ("model.init=/no/such/file.pt", "model.init='/no/such/file.pt' is not a file"),
    ("checkpoint.resume=/no/such/dir", "checkpoint.resume='/no/such/dir' is neither auto, never"),
    ("model", "must look like key.sub=value"),
    ("train=3", "'train' must be a mapping"),
])
def test_rejections_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_experiment(ROOT / "configs/vit_tiny.yaml", override.split(" "))
    assert message in str(e.value)


def test_generator_arguments_are_checked_against_the_generator():
    with pytest.raises(ConfigError, match="data.params: num_points not an argument of generator 'gratings'; "
                                          "it takes min_cycles, max_cycles, noise"):
        load_experiment(ROOT / "configs/vit_tiny.yaml", ["data.source=gratings", "data.params={num_points: 5}"])
    cfg = load_experiment(ROOT / "configs/vit_tiny.yaml", ["data.source=fractal", "data.params={num_points: 5000}"]).cfg
    assert cfg.data.params == {"num_points": 5000}


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor=3", "parallel.tensor=3 must divide the 4 attention heads of the image tower of clip_tiny"),
    ("parallel.pipe=5", "parallel.pipe=5 is more stages than the 4 blocks of clip_tiny"),
])
def test_clip_layout_rejections(override, message):
    with pytest.raises(ConfigError) as e:
        load_experiment(ROOT / "configs/clip_tiny.yaml", [override])
    assert message in str(e.value)


def test_zero2_with_pipeline_is_rejected_before_anything_starts():
    with pytest.raises(ConfigError, match="parallel.zero=2 cannot run with parallel.pipe=2: DeepSpeed's pipeline "
                                          "engine supports only ZeRO 0 and 1"):
        load_config(ROOT / "configs/vit_tiny.yaml", ["parallel.pipe=2", "parallel.zero=2"])


def test_large_layouts_validate_for_their_allocations():
    huge = load_config(ROOT / "configs/vit_huge_fdsl.yaml")
    lay = validate_layout(huge, 64)  # 16 nodes x 4 GPUs
    assert (lay.tensor, lay.data, lay.grad_accum) == (4, 16, 2)
    giant = load_config(ROOT / "configs/vit_22b.yaml")
    lay = validate_layout(giant, 256)  # 64 nodes x 4 GPUs
    assert (lay.pipe, lay.tensor, lay.data, lay.grad_accum) == (8, 4, 8, 16)
    with pytest.raises(ConfigError, match="world size 48 is not divisible by parallel.pipe x parallel.tensor = 8 x 4"):
        validate_layout(giant, 48)


def test_pipeline_with_fp32_zero0_clips_in_vitscale():
    # DeepSpeed's fp32 ZeRO-0 clipping miscounts pipeline stages: the engine clips instead.
    cfg = load_config(ROOT / "configs/vit_tiny.yaml", ["parallel.pipe=2", "parallel.zero=0"])
    assert compose_ds_config(cfg, 1)["gradient_clipping"] == 0.0 and cfg.optim.grad_clip == 1.0
    cfg = load_config(ROOT / "configs/vit_tiny.yaml", ["parallel.pipe=2", "parallel.zero=1"])
    assert compose_ds_config(cfg, 1)["gradient_clipping"] == 1.0


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_layout_checks_need_world_size():
    cfg = load_config(ROOT / "configs/vit_tiny.yaml", ["train.micro_batch=8", "train.global_batch=48"])
    lay = validate_layout(cfg, 2)
    assert (lay.data, lay.grad_accum) == (2, 3)
    with pytest.raises(ConfigError, match=r"train.global_batch=48 must be a multiple of train.micro_batch x "
                                          r"data-parallel ranks = 8 x 4 = 32"):
        validate_layout(cfg, 4)
    cfg.parallel.tensor = 2
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.pipe x parallel.tensor = 1 x 2"):
        validate_layout(cfg, 3)


def test_ds_config_is_composed_from_the_experiment():
    cfg = load_config(ROOT / "configs/vit_tiny.yaml", ["train.precision=bf16", "parallel.zero=3",
                                                       "train.micro_batch=4", "train.global_batch=32",
                                                       "parallel.offload=all", "optim.grad_clip=0.5"])
    ds = compose_ds_config(cfg, validate_layout(cfg, 2).data)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert "scheduler" not in ds  # ours, handed to deepspeed.initialize (see vitscale.train.optim.lr_schedule)
    # bf16 (issue 18): fp32 gradient accumulation and reduction, DeepSpeed's skip of NaN / Inf steps on.
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    assert ds["bf16"]["check_grad_overflow"] is True


@pytest.mark.parametrize("overrides, accum, comm", [
    (["train.precision=bf16"], "fp32", "fp32"),
    (["train.precision=bf16", "train.grad_comm_dtype=bf16"], "fp32", "bf16"),
    (["train.precision=bf16", "parallel.pipe=2"], "fp32", "fp32"),
    (["train.precision=bf16", "parallel.tensor=2", "parallel.zero=2"], "fp32", "fp32"),
    (["train.precision=fp32"], None, None),  # fp32 (and fp16) keep DeepSpeed's own dtypes
])
def test_bf16_accumulates_and_reduces_gradients_in_fp32_in_every_layout(overrides, accum, comm):
    ds = compose_ds_config(load_config(ROOT / "configs/vit_tiny.yaml", overrides), 1)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == accum
    assert ds.get("communication_data_type") == comm


def test_preset_may_not_restate_what_the_experiment_owns(tmp_path):
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    with pytest.raises(ConfigError, match="sets 'train_batch_size', which the experiment config owns"):
        load_config(ROOT / "configs/vit_tiny.yaml", [f"parallel.ds_preset={preset}"])
    preset.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="precision is set by train.precision only"):
        load_config(ROOT / "configs/vit_tiny.yaml", [f"parallel.ds_preset={preset}"])
    preset.write_text(json.dumps({"zero_optimization": {"stage": 1}, "communication_data_type": "bf16"}))
    with pytest.raises(ConfigError, match="sets 'communication_data_type', which the experiment config owns"):
        load_config(ROOT / "configs/vit_tiny.yaml", [f"parallel.ds_preset={preset}"])


@pytest.mark.parametrize("preset, message", [
    ({"bf16": {"check_grad_overflow": False}}, "sets bf16.check_grad_overflow=False: ZeRO-2 would then apply a "
                                               "step with NaN / Inf gradients; remove the key"),
    ({"zero_optimization": {"stage": 1, "compute_grad_norm": False}},
     "sets zero_optimization.compute_grad_norm=false: ZeRO would then apply a step with NaN / Inf gradients"),
])
def test_a_preset_may_not_turn_off_the_skip_of_bad_steps(tmp_path, preset, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs/vit_tiny.yaml", [f"parallel.ds_preset={path}", "train.precision=bf16"])


def test_every_schema_key_round_trips_through_yaml(tmp_path):
    from vitscale.config import save_config

    cfg = load_config(ROOT / "configs/vit_tiny.yaml")
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    flat = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert {k.split(".")[0] for k in all_keys()} == set(flat)
    # the public keys DESIGN.md names
    for key in ["model.name", "model.init", "data.source", "data.shards", "parallel.pipe", "parallel.tensor",
                "parallel.zero", "train.steps", "train.seed", "train.precision", "train.micro_batch",
                "train.global_batch", "train.lr", "run.dir", "checkpoint.every", "checkpoint.resume"]:
        assert key in all_keys()
    assert Config() == Config()
