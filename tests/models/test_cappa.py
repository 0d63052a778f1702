"""CapPa (models/cappa.py, train.objective=cappa): the decoder's two branches, its FLOPs, its loss, the
image tower's timm export and the config's refusals. The layouts (tensor 2, data 2 with ZeRO-3) against
one process are in tests/train/test_parallel.py (the CLIP launch)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.models import create_model
from vitscale.models.flops import forward_flops
from vitscale.models.interop import convert_state_dict, create_timm_model, library_config
from vitscale.models.losses import create_loss
from vitscale.models.noise import sample_keys
from vitscale.train.captioning import parallel_share

from tests.conftest import ROOT

CLIP_TINY = str(ROOT / "configs" / "clip_tiny.yaml")
VOCAB, LENGTH = 1000, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("cappa_tiny", decoder=dict(layers=2, width=32, heads=4)).eval()


def _inputs(batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(1, VOCAB, (batch, LENGTH), generator=g)


def test_parallel_prediction_reads_no_caption_token(model):
    images, tokens = _inputs()
    other = torch.randint(1, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(9))
    every = torch.ones(len(tokens), dtype=torch.bool)
    with torch.no_grad():
        masked = model(images, tokens, every)
        assert torch.equal(masked, model(images, other, every))  # the caption never enters: all inputs are [MASK]
        assert not torch.allclose(masked, model(images, other, ~every))  # the autoregressive branch does read it
        assert not torch.allclose(masked[0], model(images.flip(0), tokens, every)[0])  # the image does enter


def test_autoregressive_branch_is_causal(model):
    images, tokens = _inputs()
    none = torch.zeros(len(tokens), dtype=torch.bool)
    for t in (1, 7, LENGTH - 1):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] % (VOCAB - 1)) + 1  # another word at position t
        with torch.no_grad():
            before, after = model(images, tokens, none), model(images, changed, none)
        assert torch.equal(before[:, :t], after[:, :t]), f"token {t} changed logits before it"
        assert not torch.allclose(before[:, t:], after[:, t:])  # and it is read from position t on


def test_branches_are_chosen_per_sample(model):
    images, tokens = _inputs()
    mixed = torch.tensor([True, False, True])
    with torch.no_grad():
        out = model(images, tokens, mixed)
        assert torch.allclose(out[mixed], model(images[mixed], tokens[mixed], mixed[mixed]), atol=1e-5)
        assert torch.allclose(out[~mixed], model(images[~mixed], tokens[~mixed], None), atol=1e-5)


def test_forward_flops_equal_torch_flop_counter(model):
    images, tokens = _inputs(batch=1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, tokens, torch.tensor([False]))
    assert forward_flops(model) == counter.get_total_flops() == forward_flops(model.cfg)


def test_planner_layers_hold_every_parameter_and_flop_once(model):
    from vitscale.models.cappa import cappa_layers
    from vitscale.models.flops import layer_flops

    layers = cappa_layers(model)
    held = [id(p) for _, layer in layers for p in layer.parameters()]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one layer
    assert len(layer_flops(model)) == len(layers) and sum(layer_flops(model)) == forward_flops(model)


def test_captioning_loss_is_the_mean_next_token_cross_entropy_per_caption():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 11)
    tokens = torch.tensor([[9, 3, 4, 10, 0, 0], [9, 5, 6, 7, 8, 10]])  # start, words, end, padding
    got = create_loss("captioning")(logits, tokens)
    # Reference: each caption on its own, its padding cut off, position t predicting token t + 1.
    ref = [F.cross_entropy(logits[0, :3], tokens[0, 1:4]), F.cross_entropy(logits[1, :5], tokens[1, 1:6])]
    assert torch.allclose(got, torch.stack(ref))


def test_parallel_share_is_the_fraction_and_a_function_of_the_key():
    keys = sample_keys(0, torch.arange(20000))
    share = parallel_share(keys, 0.75)
    assert abs(share.float().mean().item() - 0.75) < 0.01
    assert torch.equal(share[5000:5016], parallel_share(keys[5000:5016], 0.75))  # any micro-batch, same choice
    assert not parallel_share(keys, 0.0).any() and parallel_share(keys, 1.0).all()


def test_image_tower_exports_to_timm(model):
    timm_model = create_timm_model(library_config(model, "timm")).eval()
    timm_model.load_state_dict(convert_state_dict(model.state_dict(), "timm", model), strict=True)
    images, _ = _inputs()
    with torch.no_grad():
        assert torch.allclose(timm_model(images), model.encode_image(images), atol=1e-5)


def test_objective_resolves_a_clip_size_to_its_captioner():
    exp = load_experiment(CLIP_TINY, ["train.objective=cappa", "model.decoder.layers=3"])
    assert exp.model.kind == "cappa" and exp.model.arch.decoder.layers == 3
    assert exp.task == "image_text" and exp.model.text.vocab_size == VOCAB
    assert not any(n.startswith("text.") for n in exp.model.meta().state_dict())  # no text tower is built


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pipe=2"], "CapPa under parallel.pipe>1 is not supported yet"),
    (["train.cappa.parallel_fraction=1.5"], r"train.cappa.parallel_fraction=1.5 must be in \[0, 1\]"),
    (["model.decoder.heads=3"], "model.decoder.width=64 must be divisible by model.decoder.heads=3"),
    (["train.loss=siglip"], "does not apply to train.objective=cappa"),
])
def test_bad_cappa_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(CLIP_TINY, ["train.objective=cappa", *overrides])


def test_cappa_needs_a_clip_size():
    with pytest.raises(ConfigError, match="model.name=vit_tiny_patch16 is a ViT classifier: use a clip_"):
        load_experiment(str(ROOT / "configs" / "vit_tiny.yaml"), ["train.objective=cappa"])
