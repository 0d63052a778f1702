"""CapPa's split of every batch (Tschannen et al. 2023): each sample is trained either by
autoregressive captioning or by parallel prediction, ``train.cappa.parallel_fraction`` of them the
latter.

The choice is a pure function of the sample's noise key (``models/noise.py``: from ``train.seed`` and
the sample's position in the run), hashed at a site of its own, so a sample takes the same branch in
every layout (data, ZeRO, tensor ranks alike) and on a resumed run. It is a Bernoulli draw per sample,
as the paper's batch split: a micro-batch may hold a few more or fewer than the fraction.
"""
from __future__ import annotations

from typing import Callable

import torch

from vitscale.models.noise import keyed_uniform, site_of

SITE = site_of("train.cappa.parallel")  # the split's hash site, apart from every model layer's


def parallel_share(keys: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which samples predict in parallel: (B,) bool from their noise keys (B,) int64."""
    return keyed_uniform(keys, SITE, torch.zeros((), dtype=torch.int64, device=keys.device)) < fraction


def split_batches(fetch: Callable[[], tuple], fraction: float) -> Callable[[], tuple]:
    """Wrap ``fetch`` (micro-batches as (model inputs, target, noise keys): (images, tokens), tokens, keys)
    so that the model also gets each sample's branch, and the objective with its target:
    ((images, tokens, parallel), (tokens, parallel), keys)."""

    def fetch_split() -> tuple:
        inputs, target, keys = fetch()
        parallel = parallel_share(keys, fraction)
        return (*inputs, parallel), (target, parallel), keys

    return fetch_split
