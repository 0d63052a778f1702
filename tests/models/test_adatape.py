"""AdaTape (model.adatape, models/adatape.py): per-sample tape tokens, masked slots ignored, FLOPs,
and a model that trains. Tensor 2 against one process is in tests/train/test_parallel.py's launches."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.models import create_model
from vitscale.models.adatape import AdaptiveTapeReader
from vitscale.models.flops import forward_flops

from tests.conftest import TINY

SMALL = dict(img_size=32, patch_size=8, num_classes=10, depth=2, num_heads=4, embed_dim=64)


def _model(bank="input", max_tokens=6, threshold=0.5, bank_size=16, seed=0):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16", **SMALL, adatape_bank=bank, adatape_bank_size=bank_size,
                        adatape_max_tokens=max_tokens, adatape_threshold=threshold)


def test_a_confident_sample_reads_fewer_tokens_than_an_unsure_one():
    """A bank of one-hot tokens and an identity query: a sample whose tokens point at one bank token
    (its score near 1) reads one token; a sample pointing nowhere (uniform scores) reads max_tokens."""
    dim, bank_size = 8, 8
    reader = AdaptiveTapeReader(dim, "learnable", bank_size, max_tokens=5, threshold=0.6, img_size=32)
    with torch.no_grad():
        reader.bank.copy_(torch.eye(bank_size, dim)[None])
        reader.query.weight.copy_(torch.eye(dim))
        reader.query.bias.zero_()
    tokens = torch.zeros(2, 3, dim)
    tokens[0, :, 2] = 50.0  # sample 0: sure of bank token 2
    x, mask = reader(tokens, torch.zeros(2, 3, 32, 32))
    assert reader.last_counts.tolist() == [1, 5]
    assert x.shape == (2, 3 + 5, dim) and mask.shape == (2, 1, 1, 3 + 5)
    assert mask[0, 0, 0].tolist() == [True] * 3 + [True] + [False] * 4
    assert torch.equal(x[0, 3], reader.bank[0, 2]) and not x[0, 4:].any()  # the read token; unread slots zero


def test_per_sample_counts_differ_and_respect_max_tokens():
    model = _model(max_tokens=6, threshold=0.7)
    with torch.no_grad():  # sharper scores than at init (a trained reader's), so that samples differ
        model.adatape.query.weight.mul_(40)
    model(torch.randn(32, 3, 32, 32))
    counts = model.adatape.last_counts
    assert counts.min() >= 1 and counts.max() <= 6
    assert len(set(counts.tolist())) > 1, f"every sample read {counts.tolist()[0]} tokens"
    read, samples = model.adatape.take_counts().tolist()
    assert samples == 32 and read == counts.sum()
    assert model.adatape.take_counts().tolist() == [0.0, 0.0]  # taken: reset


def test_unread_tape_slots_change_nothing():
    model = _model(max_tokens=6, threshold=0.3).eval()
    images = torch.randn(4, 3, 32, 32)
    reader, original = model.adatape, model.adatape.forward
    ref = model(images)
    assert (reader.last_counts < 6).all()  # there are unread slots to tamper with
    n = model.cfg.seq_len

    def tampered(slots):
        def forward(tokens, imgs):
            x, mask = original(tokens, imgs)
            noise = torch.randn_like(x) * 100
            read = torch.arange(x.shape[1] - n) < reader.last_counts[:, None]  # from the counts, not the mask
            pick = torch.zeros_like(mask[:, 0, 0])
            pick[:, n:] = slots(read)
            return torch.where(pick[..., None], x + noise, x), mask
        return forward

    reader.forward = tampered(lambda read: ~read)  # unread slots only
    assert torch.equal(model(images), ref)
    reader.forward = tampered(lambda read: read)  # the read slots: the test can see a change
    assert not torch.allclose(model(images), ref)


@pytest.mark.parametrize("bank", ["learnable", "input"])
def test_flops_count_the_tape_at_max_tokens(bank):
    """The formula against torch's FLOP counter (SDPA's math kernel: the counter skips the fused kernel
    that a masked CPU attention uses). The blocks run on every tape slot, read or not."""
    model = _model(bank=bank, max_tokens=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32))
    assert forward_flops(model) == counter.get_total_flops() // 2
    plain = create_model("vit_tiny_patch16", **SMALL)
    assert forward_flops(model) > forward_flops(plain)


def test_adatape_model_trains():
    model = _model(bank="learnable", bank_size=16, max_tokens=4)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.adatape.bank.grad.abs().sum() > 0  # the tape is trained too (read tokens get gradient)
    assert model.adatape.query.weight.grad.abs().sum() > 0  # the scores too (straight-through)


def test_bad_adatape_configs_are_refused_before_start():
    with pytest.raises(ConfigError, match="parallel.pipe"):
        load_experiment(TINY, ["model.adatape.bank=input", "parallel.pipe=2"])
    with pytest.raises(ConfigError, match="square number"):
        load_experiment(TINY, ["model.adatape.bank=input", "model.adatape.bank_size=60"])
    with pytest.raises(ConfigError, match="max_tokens"):
        load_experiment(TINY, ["model.adatape.bank=learnable", "model.adatape.max_tokens=100"])
    spec = load_experiment(TINY, ["model.adatape.bank=learnable"]).model
    assert spec.arch.tape_tokens == 8 and spec.forward_flops() > load_experiment(TINY).model.forward_flops()
