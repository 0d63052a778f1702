"""What a CLIP step minimises (train/objective.py), on one process: the loss ``train.loss`` picks for
the model's kind, the logit scale entering unclamped (its clamp is on the parameter after the
step, train/optim.py), and whole-batch accumulation giving the whole batch's gradient to the
towers and to the logit scale and bias alike."""
import math

import pytest
import torch
from torch import nn

from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.models import create_model
from vitscale.models.losses import ClipLoss, SigLipLoss
from vitscale.train.initial_weights import load_initial_weights
from vitscale.train.objective import WholeBatchContrastive, build_objective


class _Towers(nn.Module):
    """Linear towers and the CLIP scalars: enough to see every gradient of the objective."""

    def __init__(self, scale: float, bias: float | None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        for p in self.parameters():
            nn.init.normal_(p, generator=g)
        self.logit_scale = nn.Parameter(torch.tensor([scale]))
        self.logit_bias = nn.Parameter(torch.tensor([bias])) if bias is not None else None

    def forward(self, x, y):
        out = (nn.functional.normalize(self.image(x), dim=-1), nn.functional.normalize(self.text(y), dim=-1),
               self.logit_scale.exp()[0])
        return out if self.logit_bias is None else (*out, self.logit_bias[0])


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _step(model, objective, accum, x, y):
    """One step as train/step.py's PlainSteps takes it: a collecting pass, then each micro-batch's
    loss scaled by 1 / accum (DeepSpeed) and backward."""
    model.zero_grad()
    parts = list(zip(x.chunk(accum), y.chunk(accum)))
    if objective.whole_batch:
        objective.collect()
        with torch.no_grad():
            for a, b in parts:
                objective(model(a, b))
        objective.train()
    losses = []
    for a, b in parts:
        loss = objective(model(a, b))
        (loss / accum).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean(), _grads(model)


LOSSES = {"clip": (lambda: ClipLoss(local_loss=True), math.log(1 / 0.07), None),
          "siglip": (lambda: SigLipLoss(), math.log(10), -10.0)}


@pytest.mark.parametrize("name", LOSSES)
def test_whole_batch_accumulation_is_the_whole_batch_gradient_scalars_included(name):
    # Two accumulated micro-batches must train what one batch of both does: the towers and the
    # logit scale / bias (a scalar of the whole batch, which must take its gradient once per step,
    # not once per micro-batch as open_clip's accum_freq gives it).
    make, scale, bias = LOSSES[name]
    x, y = _data()
    model = _Towers(scale, bias)
    ref_loss, ref = _step(model, WholeBatchContrastive(make(), 1), 1, x, y)
    loss, got = _step(model, WholeBatchContrastive(make(), 2), 2, x, y)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert ref["logit_scale"].abs() > 1e-4 and (bias is None or ref["logit_bias"].abs() > 1e-3)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("accum", [1, 2])
def test_logit_scale_above_log_100_keeps_its_gradient(name, accum):
    # open_clip clamps the parameter after the step; a clamp inside the loss would give a logit
    # scale above log 100 no gradient (and a different loss value).
    make, _, bias = LOSSES[name]
    x, y = _data()
    model = _Towers(5.0, bias)  # exp(5) = 148 > 100
    loss, grads = _step(model, WholeBatchContrastive(make(), accum), accum, x, y)
    with torch.no_grad():
        outputs = model(x, y)
    assert loss.item() == pytest.approx(make()(*outputs).item(), rel=1e-6)  # the unclamped scale's loss
    assert grads["logit_scale"].abs().item() > 1e-6


def test_train_loss_names_the_loss_of_the_models_kind():
    clip = load_experiment("clip_tiny")
    assert clip.model.loss == "clip" and clip.model.create().logit_bias is None
    assert load_experiment("clip_tiny", ["train.loss=softmax"]).model.loss == "clip"  # earlier runs' config.yaml
    siglip = load_experiment("clip_tiny", ["train.loss=siglip"])
    assert siglip.model.loss == "siglip"
    assert siglip.model.kwargs["init_logit_bias"] == -10.0 and siglip.model.kwargs["init_logit_scale"] == math.log(10)
    model = siglip.model.create()
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == pytest.approx(math.log(10))
    assert isinstance(build_objective(siglip.cfg, "clip").loss, SigLipLoss)
    assert isinstance(build_objective(clip.cfg, "clip").loss, ClipLoss)
    assert dict(clip.model.clamped) == {"logit_scale": (0.0, math.log(100))}
    vit = load_experiment("vit_tiny")
    assert vit.model.loss == "softmax" and vit.model.clamped == ()
    assert load_experiment("vit_tiny", ["train.loss=sigmoid"]).model.loss == "sigmoid"
    with pytest.raises(ConfigError, match="train.loss=sigmoid is a loss of a classifier.*train.loss=siglip"):
        load_experiment("clip_tiny", ["train.loss=sigmoid"])
    with pytest.raises(ConfigError, match="train.loss=siglip is a loss of a CLIP.*softmax or sigmoid"):
        load_experiment("vit_tiny", ["train.loss=siglip"])
    with pytest.raises(ConfigError, match="choose one of"):
        load_experiment("clip_tiny", ["train.loss=infonce"])


def test_clip_weights_start_a_siglip_run_with_its_own_bias(tmp_path):
    # A CLIP trained with the softmax loss has no logit_bias: SigLIP starts from its own (-10),
    # as open_clip's load_checkpoint adds one; and a SigLIP bias is left out of a clip run.
    torch.manual_seed(0)
    clip, siglip = create_model("clip_tiny"), create_model("clip_tiny", init_logit_bias=-10.0)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    torch.save(siglip.state_dict(), tmp_path / "siglip.pt")
    target = create_model("clip_tiny", init_logit_bias=-10.0)
    load_initial_weights(target, tmp_path / "clip.pt")
    assert target.logit_bias.item() == -10.0 and torch.equal(target.visual.proj, clip.visual.proj)
    target = create_model("clip_tiny")
    load_initial_weights(target, tmp_path / "siglip.pt")
    assert torch.equal(target.visual.proj, siglip.visual.proj)
