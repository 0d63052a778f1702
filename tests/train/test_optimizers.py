"""optim.name: Lion and LAMB as the papers state them, which implementation runs where, and the
layouts LAMB refuses. (That Lion and LAMB train the same function in data / ZeRO-2 / tensor / pipe
layouts is in tests/train/test_parallel.py, in its 2-process launch.)"""
import pytest
import torch

from vitscale.config import ConfigError, compose_ds_config, load_config
from vitscale.config.deepspeed import optimizer_of
from vitscale.config.validation import check_config
from vitscale.train.optim import client_optimizer

from tests.conftest import TINY

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.99), 1e-6


def _problem():
    """Two parameters (one decayed, one not) and three gradients each, fixed."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(3)]
    return weights, grads


def _run(kind: str, weights, grads) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": [params[0]], "weight_decay": WD}, {"params": [params[1]], "weight_decay": 0.0}]
    section = {"type": kind, "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}}
    opt = client_optimizer(optimizer_of({"optimizer": section}), groups, "cpu")
    for step in grads:
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        opt.step()
    return [p.detach() for p in params]


def test_lion_is_the_papers_update():
    # Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2 (decoupled decay).
    weights, grads = _problem()
    expected = []
    for i, (w, decay) in enumerate(zip(weights, (WD, 0.0))):
        w, m = w.clone(), torch.zeros_like(w)
        for step in grads:
            g = step[i]
            w = w - LR * (torch.sign(BETAS[0] * m + (1 - BETAS[0]) * g) + decay * w)
            m = BETAS[1] * m + (1 - BETAS[1]) * g
        expected.append(w)
    got = _run("Lion", weights, grads)
    for e, w, start in zip(expected, got, weights):
        assert torch.allclose(w, e, atol=1e-6), (w - e).abs().max()
        assert not torch.allclose(w, start)


def test_lamb_is_the_papers_update():
    # You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2 with bias correction and
    # phi = identity; as in the BERT recipe, parameters without weight decay (biases, norms) are not
    # layer-adapted (trust ratio 1).
    weights, grads = _problem()
    expected, ratios = [], []
    for i, (w, decay) in enumerate(zip(weights, (WD, 0.0))):
        w, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        for t, step in enumerate(grads, start=1):
            g = step[i]
            m = BETAS[0] * m + (1 - BETAS[0]) * g
            v = BETAS[1] * v + (1 - BETAS[1]) * g * g
            r = (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS) + decay * w
            ratio = (w.norm() / r.norm()).item() if decay else 1.0
            ratios.append(ratio)
            w = w - LR * ratio * r
        expected.append(w)
    got = _run("Lamb", weights, grads)
    for e, w in zip(expected, got):
        assert torch.allclose(w, e, atol=1e-6), (w - e).abs().max()
    assert max(abs(r - 1) for r in ratios) > 0.3  # the trust ratio matters here: ignoring it would fail above


def test_deepspeeds_kernel_where_it_has_one_timms_elsewhere():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4))]}]
    lion = {"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0}}}
    assert type(client_optimizer(optimizer_of(lion), groups, "cpu")).__name__ == "Lion"
    assert client_optimizer(optimizer_of(lion), groups, "cuda") is None  # DeepSpeed's FusedLion
    offload = {**lion, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert client_optimizer(optimizer_of(offload), groups, "cpu") is None  # DeepSpeed's CPU Lion (ZeRO-Offload)
    adam = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    assert client_optimizer(optimizer_of(adam), groups, "cpu") is None
    lamb = {"optimizer": {"type": "Lamb", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "eps": 1e-6,
                                                     "weight_decay": 0.0}}}
    assert type(client_optimizer(optimizer_of(lamb), groups, "cpu")).__name__ == "Lamb"
    assert client_optimizer(optimizer_of({**lamb, "fp16": {"enabled": True}}), groups, "cuda") is None  # FusedLamb
    with pytest.raises(ValueError, match="set train.precision=fp32"):
        client_optimizer(optimizer_of({**lamb, "fp16": {"enabled": True}}), groups, "cpu")


def test_optimizer_names_compose_and_lamb_refuses_flat_partitions():
    cfg = load_config(TINY, ["optim.name=lion", "optim.weight_decay=0.5"])
    ds = compose_ds_config(cfg, data_parallel=1)
    assert ds["optimizer"]["type"] == "Lion" and ds["optimizer"]["params"]["weight_decay"] == 0.5
    assert compose_ds_config(load_config(TINY, ["optim.name=lamb", "parallel.zero=0"]),
                             data_parallel=1)["optimizer"]["type"] == "Lamb"
    check_config(load_config(TINY, ["optim.name=lamb", "parallel.zero=0", "train.precision=fp32"]))
    for bad in (["parallel.zero=1"], ["parallel.zero=0", "parallel.tensor=2"]):
        with pytest.raises(ConfigError, match="optim.name=lamb needs whole parameters"):
            check_config(load_config(TINY, ["optim.name=lamb", "train.precision=fp32", *bad]))
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(TINY, ["optim.name=sgd"])
