"""Fast unit tests of the training pieces: LR schedule, parameter groups, peak table,
launcher detection (environment only, no process group)."""
import math

import pytest

from vitscale.distributed import detect_launcher, expand_nodelist, world_size_from_env
from vitscale.models import create_model
from vitscale.train.optim import lr_lambda, param_groups
from vitscale.train.throughput import device_peak_tflops


def test_warmup_then_cosine():
    ratios = [lr_lambda(i, steps=10, warmup=4) for i in range(10)]
    assert ratios[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert ratios[-1] == pytest.approx(0.0, abs=1e-12)
    assert ratios[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_lambda(9, 10, 4, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(0, 10, 4, init_ratio=0.2) == pytest.approx(0.4)
    assert [lr_lambda(i, 10, 2, "constant") for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(0, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))  # no warm-up


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {
        "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}


def test_peak_table():
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("cpu") is None


def test_slurm_nodelist_expansion():
    assert expand_nodelist("jwb0001") == ["jwb0001"]
    assert expand_nodelist("jwb[0001-0003,0010],login1") == ["jwb0001", "jwb0002", "jwb0003", "jwb0010", "login1"]
    assert expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]


_LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK",
                "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"]


@pytest.mark.parametrize("env, launcher, world", [
    ({}, "single", 1),
    ({"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, "env", 8),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16"}, "mpi", 16),
    ({"PMI_RANK": "3", "PMI_SIZE": "4"}, "mpi", 4),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "32", "SLURM_STEP_ID": "0"}, "slurm", 32),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "32"}, "single", 1),  # the batch script itself, outside srun
    ({"RANK": "0", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, "env", 4),
])
def test_launcher_detection(monkeypatch, env, launcher, world):
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert detect_launcher() == launcher
    assert world_size_from_env() == world


class _FakeAccelerator:
    def __init__(self, bf16, fp16):
        self.bf16, self.fp16 = bf16, fp16

    def is_bf16_supported(self):
        return self.bf16

    def is_fp16_supported(self):
        return self.fp16

    def device_name(self):
        return "cpu"


def test_unsupported_precision_is_refused_early():
    from vitscale.config import ConfigError
    from vitscale.train.setup import check_precision

    check_precision("fp16", _FakeAccelerator(True, True))
    check_precision("fp32", _FakeAccelerator(False, False))
    with pytest.raises(ConfigError, match="train.precision=fp16 is not supported on cpu; use one of fp32, bf16"):
        check_precision("fp16", _FakeAccelerator(True, False))


def test_initial_weights_from_a_timm_state_dict(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from vitscale.train.initial_weights import load_initial_weights

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, depth=2)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        ours = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2)
        load_initial_weights(ours, tmp_path / name)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    other_head = create_model("vit_tiny_patch16", img_size=32, num_classes=5, depth=2)
    head = other_head.head.weight.clone()
    load_initial_weights(other_head, tmp_path / "w.pt")  # another class count: the head stays the model's own
    assert torch.equal(other_head.head.weight, head)
    assert torch.equal(other_head.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    wrong = create_model("vit_tiny_patch16", img_size=32, num_classes=3, depth=2, mlp_ratio=2.0)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight"):
        load_initial_weights(wrong, tmp_path / "w.pt")


def test_channels_last_hands_the_model_the_same_images_in_nhwc_memory():
    import torch

    from vitscale.config import ConfigError
    from vitscale.data.sources import Batch
    from vitscale.experiment import load_experiment
    from vitscale.train.batches import make_prepare

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = Batch(images=images, labels=torch.tensor([1, 2]))
    got = {}
    for setting in ("true", "false", "auto"):  # auto: on CUDA only, so off here
        exp = load_experiment("configs/vit_tiny.yaml", [f"train.channels_last={setting}"])
        (got[setting],), _ = make_prepare(exp, torch.device("cpu"), torch.float32)(batch)
    assert got["true"].is_contiguous(memory_format=torch.channels_last) and not got["true"].is_contiguous()
    assert got["false"].is_contiguous() and got["auto"].is_contiguous()
    assert torch.equal(got["true"], got["false"]) and torch.equal(got["false"], got["auto"])
    with pytest.raises(ConfigError, match=r"train.channels_last='sometimes' is not allowed; choose one of 'auto', True"):
        load_experiment("configs/vit_tiny.yaml", ["train.channels_last=sometimes"])
