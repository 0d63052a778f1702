"""AdaTape (Xue et al. 2023, "Adaptive Computation with Elastic Input Sequence"): per sample, the
Adaptive Tape Reader picks tape tokens from a bank and appends them to the sequence, so a sample can
read more or fewer extra tokens.

- The bank: ``learnable`` (a ``bank_size`` x width parameter shared by all samples) or ``input``
  (the image's own patches at a finer patch size, ``bank_size`` of them, each a token of its own
  embedding with its own position embedding).
- The reader: a query from the input tokens (a linear map of their mean) scores every bank token
  (softmax of the scaled dot products); tokens are read in order of score until the scores read so
  far sum to ``threshold``, at most ``max_tokens`` of them. So the count differs per sample.
- The tape: ``max_tokens`` slots after the input tokens; slots a sample does not read are zero and
  masked as keys (no token attends to them), so their content changes nothing the model outputs
  (their own outputs are dropped before the head).
- Gradient: the selection is discrete; each read token enters as ``token x (1 + s - s.detach())``
  (``s`` its score): its value unchanged, its score (and so the query and the bank) gets the
  gradient the token's use gives it, a straight-through estimator written here, not taken from a
  library (timm / torch have no tape reader).

Plain torch on one device, as ``vit.py``: the reader is a replicated module under tensor parallelism
(like the patch embedding). The per-sample counts of the forward passes since the last ``take_counts``
are kept for the train record (``tape_tokens``).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class AdaptiveTapeReader(nn.Module):
    """The Adaptive Tape Reader and its bank (module docstring).

    Args:
        dim: the model's width.
        bank: ``learnable`` or ``input``.
        bank_size: tokens in the bank (``input``: a square number, its side dividing ``img_size``).
        max_tokens: tape slots per sample.
        threshold: softmax score a sample reads up to, in (0, 1].
        img_size, in_chans: the input images (``input`` bank).
    """

    def __init__(self, dim: int, bank: str, bank_size: int, max_tokens: int, threshold: float, img_size: int,
                 in_chans: int = 3):
        super().__init__()
        self.bank_kind, self.bank_size, self.max_tokens, self.threshold = bank, bank_size, max_tokens, threshold
        self.query = nn.Linear(dim, dim)
        if bank == "learnable":
            self.bank = nn.Parameter(torch.zeros(1, bank_size, dim))
            self.bank_embed, self.bank_pos = None, None
        else:
            patch = img_size // math.isqrt(bank_size)
            self.bank = None
            self.bank_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)  # finer patches than the model's
            self.bank_pos = nn.Parameter(torch.zeros(1, bank_size, dim))
        self._read: torch.Tensor | None = None  # (tokens read, samples) since the last take_counts; not saved

    def initial_value(self, leaf: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """The reader's own parameters' init (``vit.init_weights``): bank and bank positions as timm's
        position embedding (truncated normal, std .02)."""
        return nn.init.trunc_normal_(torch.empty(shape), std=0.02, generator=gen)

    def bank_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The bank: (1, M, D) learnable, or (B, M, D) from ``images`` (B, C, H, W)."""
        if self.bank is not None:
            return self.bank
        return self.bank_embed(images).flatten(2).transpose(1, 2) + self.bank_pos

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input tokens (B, N, D) and their images -> (tokens with the tape appended (B, N + T, D),
        attention mask (B, 1, 1, N + T), True = may be attended to); T = ``max_tokens``."""
        B, N, D = tokens.shape
        query = self.query(tokens.mean(dim=1))  # (B, D)
        bank = self.bank_tokens(images).expand(B, -1, -1)  # (B, M, D)
        scores = torch.einsum("bd,bmd->bm", query, bank).mul(D ** -0.5).float().softmax(dim=-1)  # (B, M)
        top, index = scores.topk(self.max_tokens, dim=-1)  # (B, T), by descending score
        read = (top.cumsum(dim=-1) - top) < self.threshold  # read while the score so far is short of it
        picked = bank.gather(1, index[..., None].expand(-1, -1, D))  # (B, T, D)
        weight = (1 + top - top.detach()) * read  # 1 on read slots (straight-through), 0 on the others
        tape = picked * weight[..., None].to(picked.dtype)
        keys = torch.cat([torch.ones(B, N, dtype=torch.bool, device=tokens.device), read], dim=1)
        counts = read.sum(dim=-1)
        self.last_counts = counts.detach()  # (B,): tape tokens each sample of the last batch read
        read_now = torch.stack([counts.sum(), torch.tensor(B, device=counts.device)]).double()
        self._read = read_now if self._read is None else self._read + read_now
        return torch.cat([tokens, tape], dim=1), keys[:, None, None, :]

    def take_counts(self) -> torch.Tensor:
        """(tape tokens read, samples) since the last call, as a float64 device tensor; resets them."""
        taken, self._read = self._read, None
        return taken if taken is not None else torch.zeros(2, dtype=torch.float64)


def adatape_flops(dim: int, bank: str, bank_size: int, max_tokens: int, in_chans: int, img_size: int) -> int:
    """Forward FLOPs of the reader per sample (the tape's tokens in the blocks are counted there):
    the query, the scores against the bank and, for an ``input`` bank, its patch embedding."""
    embed = 2 * img_size**2 * in_chans * dim if bank == "input" else 0  # every pixel once: M x (C p^2) x D
    return 2 * dim * dim + 2 * bank_size * dim + embed


def adatape_check(bank: str | None, bank_size: int, max_tokens: int, threshold: float, img_size: int) -> None:
    """Raise ValueError for tape options that cannot work (``ViTConfig`` calls it)."""
    if bank is None:
        return
    if bank not in ("learnable", "input"):
        raise ValueError(f"ViT option adatape_bank={bank!r} must be 'learnable', 'input' or None")
    if bank_size < 1 or not 1 <= max_tokens <= bank_size:
        raise ValueError(f"ViT options adatape_bank_size={bank_size} must be >= 1 and adatape_max_tokens="
                         f"{max_tokens} in [1, bank_size]")
    if not 0 < threshold <= 1:
        raise ValueError(f"ViT option adatape_threshold={threshold} must be in (0, 1]")
    side = math.isqrt(bank_size)
    if bank == "input" and (side * side != bank_size or img_size % side):
        raise ValueError(f"ViT option adatape_bank_size={bank_size} with an input bank must be a square number whose "
                         f"side divides img_size={img_size}")
