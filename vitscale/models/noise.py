"""Randomness keyed to the sample: dropout and drop-path masks as pure functions of (sample key,
layer, element), so that every parallel layout draws the masks one process draws.

torch's RNG gives a rank a stream that depends on how many draws came before and on the rank:
data-parallel replicas would draw masks for their own samples from different streams than one
process drawing for all of them, tensor-parallel ranks (which must share one mask for the
residual stream) could draw different ones, and a pipeline's stages interleave micro-batches.
Here a mask element is ``hash(sample key, layer site, element index in the whole tensor) <
keep probability``:

- the **sample key** comes from (``train.seed``, the sample's global position in the run:
  ``step * global_batch + slot``), the same for a sample in every layout (``sample_keys``);
- the **site** is the layer's name in the whole model (``assign_noise_sites``), the same whether
  the layer sits in one process, a tensor shard or a pipeline stage;
- the **element index** is its position in the whole (unsharded) tensor of that sample: a
  tensor-parallel shard computes only its slice, from its offset (``KeyedDropout.tensor_slice``,
  ``Attention.head_offset``), never the whole mask.

Activation checkpointing recomputes the same masks, since they depend on nothing but their
inputs. Without keys (``noise=None``) the layers draw from torch's RNG as timm's do.

The hash is a counter-based one (Wellons' ``lowbias32`` finaliser on 32-bit lanes, run in int64
so no product overflows): 24 bits of uniform per element. No peer offers this: Megatron keeps
tensor-parallel ranks consistent with an RNG-state tracker, but its data-parallel layouts still
draw other masks than one process does.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x68E31DA5  # odd multipliers below 2**31: x (< 2**32) * c stays below 2**63
_GOLDEN = 0x61C88647  # 2**32 / golden ratio, below 2**31


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit avalanche hash of int64 ``x`` in [0, 2**32) (values outside are folded first); a
    Python int gives the same value as an int."""
    x = x & M32
    x = ((x ^ (x >> 16)) * _C1) & M32
    x = ((x ^ (x >> 15)) * _C2) & M32
    return x ^ (x >> 16)


def sample_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """One key per sample (int64 in [0, 2**32)) from ``train.seed`` and the samples' global
    positions in the run (int64, ``step * global_batch + slot``)."""
    seeded = mix32(seed & M32) ^ ((seed >> 32) & M32)  # on the host, in Python ints: no tensor to read back
    return mix32(mix32(positions & M32) ^ mix32((positions >> 32) + seeded))


def site_of(name: str) -> int:
    """A layer site's key from its name in the whole model (``blocks.3.mlp.drop1``)."""
    return zlib.crc32(name.encode()) & M32


def element_index(shape: tuple[int, ...], dim: int = -1, offset: int = 0, full: int | None = None,
                  device=None) -> torch.Tensor:
    """Flat index (int64, ``shape``) of each element of one sample's tensor in the whole tensor,
    where dimension ``dim`` holds the slice ``[offset, offset + shape[dim])`` of ``full`` (a
    tensor-parallel shard) and the others are whole."""
    dim = dim % len(shape)
    full_shape = list(shape)
    full_shape[dim] = shape[dim] if full is None else full
    index = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(shape))):
        ar = torch.arange(shape[d], dtype=torch.int64, device=device) + (offset if d == dim else 0)
        view = [1] * len(shape)
        view[d] = shape[d]
        index = index + ar.view(view) * stride
        stride *= full_shape[d]
    return index


def keyed_uniform(keys: torch.Tensor, site: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in [0, 1) (float32, 24 bits), shape (B, *index.shape): sample ``b``'s
    element ``index`` at ``site``."""
    base = mix32(keys ^ site).view(-1, *([1] * index.dim()))
    bits = mix32(mix32(base * _GOLDEN + index))
    return (bits >> 8).to(torch.float32) * (2.0 ** -24)


def keyed_dropout(x: torch.Tensor, p: float, keys: torch.Tensor, site: int, dim: int = -1, offset: int = 0,
                  full: int | None = None) -> torch.Tensor:
    """Dropout of ``x`` (B, ...) with sample ``b``'s mask keyed by ``keys[b]``; see ``element_index``
    for a tensor-parallel slice along ``dim``. Kept elements are scaled by 1 / (1 - p)."""
    keep = 1.0 - p
    u = keyed_uniform(keys.to(x.device), site, element_index(tuple(x.shape[1:]), dim, offset, full, x.device))
    return x * (u < keep).to(x.dtype) / keep


class KeyedDropout(nn.Module):
    """``nn.Dropout`` whose mask is keyed to the sample when the forward gets ``noise`` keys.

    ``tensor_slice`` = (offset, full width) when the last dimension is a tensor-parallel slice
    (set by ``tensor_parallel.parallelize_vit``); ``site`` is set by ``assign_noise_sites``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.site = 0
        self.tensor_slice: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        if noise is None:
            return nn.functional.dropout(x, self.p, True)
        offset, full = self.tensor_slice or (0, None)
        return keyed_dropout(x, self.p, noise, self.site, -1, offset, full)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def assign_noise_sites(model: nn.Module) -> nn.Module:
    """Key every stochastic layer of a whole model (anything with a ``site``) by its name in it;
    call once on the whole model, before it is split into shards or stages."""
    for name, module in model.named_modules():
        if hasattr(module, "site"):
            module.site = site_of(name)
    return model


__all__ = ["KeyedDropout", "assign_noise_sites", "element_index", "keyed_dropout", "keyed_uniform", "mix32",
           "sample_keys", "site_of"]
