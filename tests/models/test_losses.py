"""CLIP and SigLIP losses over data-parallel groups of gloo processes against the full batch on
one process: the mean of the ranks' losses is the full-batch loss, and gradients averaged over
the data ranks (as DeepSpeed does) are the full-batch gradients; with tensor 2 x data 2 only the
data group is exchanged. Single-process values match open_clip's losses."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests.conftest import run_in_gloo
from vitscale.models.losses import ClipLoss, SigLipLoss, create_loss, list_losses

B_LOCAL, IMG_IN, TXT_IN, EMBED = 4, 6, 5, 8
LOSSES = {"clip": dict(local_loss=False), "clip_local": dict(local_loss=True), "siglip": {}}


class _Towers(nn.Module):
    """Linear stand-ins for the two towers plus the learnable temperature and bias."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.image = nn.Linear(IMG_IN, EMBED)
        self.text = nn.Linear(TXT_IN, EMBED)
        for p in (*self.image.parameters(), *self.text.parameters()):
            p.data = torch.randn(p.shape, generator=gen)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))

    def forward(self, x_image, x_text):
        return F.normalize(self.image(x_image), dim=-1), F.normalize(self.text(x_text), dim=-1)


def _batch(shards: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(shards * B_LOCAL, IMG_IN, generator=gen), torch.randn(shards * B_LOCAL, TXT_IN, generator=gen)


def _loss(kind: str, towers: _Towers, x_image, x_text, group, **kw):
    images, texts = towers(x_image, x_text)
    if kind == "siglip":
        return SigLipLoss(group=group)(images, texts, towers.logit_scale.exp(), towers.logit_bias)
    return ClipLoss(group=group, **{**LOSSES[kind], **kw})(images, texts, towers.logit_scale.exp())


def _reference(kind: str, x_image, x_text):
    """Loss and gradients of the whole batch on one process."""
    towers = _Towers()
    loss = _loss(kind, towers, x_image, x_text, None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in towers.named_parameters() if p.grad is not None}


def _data_parallel(kind: str, x_image, x_text, shard: int, group, **kw):
    """This rank's shard through the loss; loss and gradients averaged over ``group`` as DeepSpeed does."""
    towers = _Towers()
    rows = slice(shard * B_LOCAL, (shard + 1) * B_LOCAL)
    loss = _loss(kind, towers, x_image[rows], x_text[rows], group, **kw)
    loss.backward()
    world = dist.get_world_size(group)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    grads = {}
    for name, p in towers.named_parameters():
        if p.grad is None:  # CLIP has no bias
            continue
        dist.all_reduce(p.grad, group=group)
        grads[name] = p.grad / world
    return mean_loss / world, grads


def _assert_matches(kind: str, got, want, what: str):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6, msg=f"{kind} loss, {what}")
    assert set(got[1]) == set(want[1])
    assert kind != "siglip" or want[1]["logit_bias"].abs() > 1e-3  # the bias gradient is checked, not zero
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5,
                                   msg=f"{kind} gradient of {name}, {what}")


def _two_data_ranks(rank: int, world: int):
    group = dist.group.WORLD
    x_image, x_text = _batch(world)
    for kind in LOSSES:
        _assert_matches(kind, _data_parallel(kind, x_image, x_text, rank, group), _reference(kind, x_image, x_text),
                        "2 data ranks")
    # Without gradients through the gather each rank sees only its own features' share
    # (open_clip's gather_with_grad=False): the loss is the same, the gradient 1/N of it.
    loss, grads = _data_parallel("clip", x_image, x_text, rank, group, gather_with_grad=False)
    ref_loss, ref_grads = _reference("clip", x_image, x_text)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grads["image.weight"], ref_grads["image.weight"] / world, rtol=1e-5, atol=1e-6)

    # open_clip's distributed losses (which gather over the world, here the same group) agree.
    import open_clip.loss as oc

    towers = _Towers()
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    images, texts = (f.detach().requires_grad_() for f in towers(x_image[rows], x_text[rows]))
    scale, bias = towers.logit_scale.detach().exp(), towers.logit_bias.detach()
    pairs = [(ClipLoss(local_loss=local, group=group)(images, texts, scale),
              oc.ClipLoss(local_loss=local, gather_with_grad=True, rank=rank, world_size=world)(images, texts, scale))
             for local in (False, True)]
    pairs.append((SigLipLoss(group=group)(images, texts, scale, bias),
                  oc.SigLipLoss(rank=rank, world_size=world)(images, texts, scale, bias)))
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        g_ours = torch.autograd.grad(ours, (images, texts))
        g_theirs = torch.autograd.grad(theirs, (images, texts))
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tensor2_data2(rank: int, world: int):
    # DeepSpeed's PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=2) puts tensor
    # innermost: tensor groups {0,1},{2,3}, data groups {0,2},{1,3}. Every rank creates every group.
    tensor, data = 2, world // 2
    data_groups = [dist.new_group([t + tensor * d for d in range(data)]) for t in range(tensor)]
    group = data_groups[rank % tensor]
    data_rank = rank // tensor  # both tensor ranks of one data rank hold the same shard
    assert dist.get_rank(group) == data_rank
    x_image, x_text = _batch(data)
    # The same data with the features gathered over all 4 ranks (each shard twice): must differ.
    twice = [torch.cat([x[d * B_LOCAL:(d + 1) * B_LOCAL] for d in range(data) for _ in range(tensor)])
             for x in (x_image, x_text)]
    for kind in LOSSES:
        got = _data_parallel(kind, x_image, x_text, data_rank, group)
        _assert_matches(kind, got, _reference(kind, x_image, x_text), "tensor 2 x data 2")
        assert not torch.allclose(got[0], _reference(kind, *twice)[0], rtol=1e-3), f"{kind} spans the world"

    # All 4 ranks as one data group: SigLIP's ring takes a two-way round and a one-way step.
    x_image, x_text = _batch(world)
    for kind in LOSSES:
        _assert_matches(kind, _data_parallel(kind, x_image, x_text, rank, dist.group.WORLD),
                        _reference(kind, x_image, x_text), "4 data ranks")


def _spawn(check, world: int):
    run_in_gloo(check, world)


@pytest.mark.distributed
def test_two_data_ranks_train_the_full_batch_loss():
    _spawn(_two_data_ranks, 2)


@pytest.mark.distributed
def test_tensor2_data2_exchanges_over_the_data_group_only():
    _spawn(_tensor2_data2, 4)


def _features(n: int = 6):
    gen = torch.Generator().manual_seed(2)
    return [F.normalize(torch.randn(n, EMBED, generator=gen), dim=-1) for _ in range(2)]


def test_single_process_losses_match_open_clip():
    oc = pytest.importorskip("open_clip.loss")
    images, texts = _features()
    scale, bias = torch.tensor(14.3), torch.tensor(-5.0)
    torch.testing.assert_close(ClipLoss()(images, texts, scale), oc.ClipLoss()(images, texts, scale),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ClipLoss(local_loss=True)(images, texts, scale), oc.ClipLoss()(images, texts, scale),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(SigLipLoss()(images, texts, scale, bias), oc.SigLipLoss()(images, texts, scale, bias),
                               rtol=1e-6, atol=1e-6)


def test_logits_and_registry():
    images, texts = _features()
    per_image, per_text = ClipLoss().get_logits(images, texts, torch.tensor(2.0))
    torch.testing.assert_close(per_image, 2 * images @ texts.T)
    torch.testing.assert_close(per_text, per_image.T)
    assert {"clip", "siglip"} <= set(list_losses())
    assert isinstance(create_loss("clip", local_loss=True), ClipLoss)
    with pytest.raises(ValueError, match="did you mean siglip"):
        create_loss("sigclip")
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(images, texts[:3], torch.tensor(1.0))
