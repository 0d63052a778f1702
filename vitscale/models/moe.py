"""Soft Mixture of Experts (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts").

A Soft MoE layer replaces a block's MLP. Every expert processes ``slots`` slots, and each
slot is a convex combination of *all* tokens of the sequence; each output token is a
convex combination of all slot outputs. Both weightings come from one token-slot
affinity matrix, computed from L2-normalised tokens and L2-normalised slot parameters
``phi`` times a learned scale (the paper's normalisation, which keeps the softmaxes from
saturating at large widths):

    logits = (scale * normalize(X)) @ normalize(phi)           (B, N, E * S)
    D = softmax over tokens (dim 1)   -> slots   = D^T X        (B, E * S, D)
    C = softmax over slots  (dim 2)   -> outputs = C expert(slots)

Nothing is discrete, so there is no token dropping, no load-balancing loss and every
expert gets the same work: the cost is fixed by ``experts * slots``, not by the routing.

The experts are MLPs (fc1 -> GELU -> fc2) stored as batched tensors (``fc1_weight`` (E, H, D)
...) so that all of them run as one batched matrix product. DeepSpeed's MoE layer
(``moe.layer.MoE`` in DeepSpeed) implements top-k token routing with all-to-all dispatch; it
has no soft (all-token) dispatch, hence this module. Experts are replicated on every
rank (data and tensor parallel alike): see ``models/tensor_parallel.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.models.noise import KeyedDropout

__all__ = ["SoftMoE"]


class SoftMoE(nn.Module):
    """Soft MoE layer: tokens (B, N, D) -> (B, N, D).

    Args:
        dim: token width D.
        hidden: each expert's MLP width.
        experts: number of experts E.
        slots: slots per expert S.
        drop: dropout after the activation and after each expert's output (as ``vit.Mlp``).
    """

    def __init__(self, dim: int, hidden: int, experts: int, slots: int = 1, drop: float = 0.0):
        super().__init__()
        self.experts, self.slots = experts, slots
        self.phi = nn.Parameter(torch.empty(dim, experts * slots))  # one column per slot
        self.scale = nn.Parameter(torch.ones(1))  # shape (1,): DeepSpeed cannot partition 0-d parameters
        self.fc1_weight = nn.Parameter(torch.empty(experts, hidden, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(experts, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(experts, dim, hidden))
        self.fc2_bias = nn.Parameter(torch.zeros(experts, dim))
        self.act = nn.GELU()
        self.drop = KeyedDropout(drop)  # after the activation
        self.drop_out = KeyedDropout(drop)  # after each expert's output (its own site: other masks)

    @staticmethod
    def initial_value(leaf: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Initial value of parameter ``leaf`` (used by ``vit.init_weights``): ``phi`` LeCun
        normal (std 1/sqrt(D), the paper's), ``scale`` 1, expert weights as timm's MLP
        (truncated normal, std .02), biases 0."""
        out = torch.empty(shape)
        if leaf == "phi":
            return nn.init.normal_(out, std=1.0 / math.sqrt(shape[0]), generator=gen)
        if leaf == "scale":
            return torch.ones(shape)
        if leaf in ("fc1_weight", "fc2_weight"):
            return nn.init.trunc_normal_(out, std=0.02, generator=gen)
        if leaf in ("fc1_bias", "fc2_bias"):
            return torch.zeros(shape)
        raise ValueError(f"SoftMoE: no init rule for parameter {leaf!r}")

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine weights of tokens (B, N, D): each (B, N, E * S); dispatch columns
        sum to 1 over the tokens, combine rows sum to 1 over the slots."""
        logits = (self.scale * F.normalize(x, dim=-1)) @ F.normalize(self.phi, dim=0)
        return logits.softmax(dim=1), logits.softmax(dim=2)

    def expert_forward(self, slots: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Slots (B, E, S, D) -> (B, E, S, D): expert e's MLP on its S slots, all experts at once."""
        h = torch.einsum("besd,ehd->besh", slots, self.fc1_weight) + self.fc1_bias[:, None]
        h = self.drop(self.act(h), noise)
        return self.drop_out(torch.einsum("besh,edh->besd", h, self.fc2_weight) + self.fc2_bias[:, None], noise)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, N, D); ``noise``: sample keys for dropout (``models/noise.py``)."""
        B, N, D = x.shape
        dispatch, combine = self.weights(x)
        slots = dispatch.transpose(1, 2) @ x  # (B, E * S, D)
        out = self.expert_forward(slots.reshape(B, self.experts, self.slots, D), noise).reshape(B, -1, D)
        return combine @ out  # (B, N, D)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, slots={self.slots}, hidden={self.fc1_weight.shape[1]}"
