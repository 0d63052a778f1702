"""Weight sparsity during training (``model.sparsity``): masks set on their schedule, applied to the
weights after every optimizer step (the module's copy and the optimizer's fp32 master copy), kept in
checkpoints, and counted for the logs. The masks themselves are ``models/sparsity.py``'s.

How it trains. The weights are exactly sparse between steps: after each optimizer step every masked
weight is set to zero again, in the module and in this rank's part of the fp32 master copy
(``optim.master_views``), so the next forward, the checkpoint and the export all see masked weights.
The backward is the dense one (the straight-through estimator of n:m training, Zhou et al. 2021,
without SR-STE's decay term: the gradient of a zeroed weight reaches the optimizer, whose update of it
is then undone), so Adam's moments stay dense. A mask is only raised: the gradual schedule's next
mask is taken by magnitude from weights whose pruned entries are zero, so the pruned set grows, as in
Zhu & Gupta's gradual magnitude pruning.

Schedules (``SparsityConfig``): ``from_start`` sets the full target once, after ``dense_warmup``
steps (0: before the first step, from the initial weights); ``gradual`` (unstructured) raises the
sparsity of each matrix on Zhu & Gupta's cubic from ``start_step`` to ``end_step``, every ``every``
steps.

Checkpoints: each rank's masks (its tensor shard, its pipeline stage) go into the DeepSpeed client
state of its model-parallel rank (``state_dict``), and a resume restores them bit-exactly; a resume
into another layout (``checkpoint.reshard=weights``) or from a dense checkpoint ranks the loaded
weights afresh (pruned weights are zero, so the same ones stay pruned). ZeRO-3 is refused before start (``config/validation.py``): its partitions split matrices
across data ranks, so no rank holds a matrix whose magnitudes it could rank.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vitscale.config.schema import SparsityConfig
from vitscale.models.sparsity import magnitude_mask, nm_mask, parse_pattern, sparse_linears, target_sparsity
from vitscale.train.optim import master_views

logger = logging.getLogger(__name__)

STATE_KEY = "sparsity_masks"  # client-state key: {whole-model name of a layer: its bool mask (this rank's slice)}


def end_step(cfg: SparsityConfig, steps: int) -> int:
    """The step the schedule reaches its target: ``end_step``, or half of ``train.steps`` when unset."""
    return cfg.end_step if cfg.end_step is not None else max(1, steps // 2)


def target_of(cfg: SparsityConfig) -> float:
    """The final sparsity: ``target``, or 1 - n/m for an n:m pattern."""
    nm = parse_pattern(cfg.pattern)
    return 1.0 - nm[0] / nm[1] if nm is not None else float(cfg.target)


class Sparsity:
    """This rank's sparsified layers, their masks and their schedule.

    Args:
        cfg: ``model.sparsity``.
        steps: ``train.steps`` (the gradual schedule's default end).
        model: this rank's model (whole, tensor shard or pipeline stage).
        tensor_group: the group the layers are sharded over (None: tensor = 1).
        model_group: the group of all ranks holding different parts of the model (pipe x tensor; None
            for one), over which counts are summed.
        layer_prefixes: for a ``PipelineModule``, each layer's name in the whole model.
        parameters: the whole model's parameter count (for ``nonzero_params``).
    """

    def __init__(self, cfg: SparsityConfig, steps: int, model: nn.Module, tensor_group=None, model_group=None,
                 layer_prefixes: Sequence[str] | None = None, parameters: int = 0):
        self.cfg, self.nm = cfg, parse_pattern(cfg.pattern)
        self.target, self.end = target_of(cfg), end_step(cfg, steps)
        self.layers = sparse_linears(model, layer_prefixes)
        self.tensor_group, self.model_group, self.parameters = tensor_group, model_group, parameters
        self.masks: dict[str, torch.Tensor] = {}  # name -> bool mask; empty while dense
        self.level = 0.0  # the sparsity the masks were last set to

    def level_at(self, step: int) -> float:
        """The scheduled sparsity after ``step`` optimizer steps."""
        c = self.cfg
        if c.schedule == "from_start":
            return self.target if step >= c.dense_warmup else 0.0
        return target_sparsity(step, self.target, c.start_step, self.end, c.every)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Set the masks the schedule asks for after ``step`` steps (collective over the tensor group
        for unstructured masks; every rank calls it at the same steps). Returns whether they changed."""
        level = self.level_at(step)
        if level <= self.level:
            return False
        for name, layer in self.layers:
            weight = layer.weight
            if self.nm is not None:
                self.masks[name] = nm_mask(weight, *self.nm)
            else:
                sharded = getattr(weight, "tensor_model_parallel", False)
                self.masks[name] = magnitude_mask(weight, level, self.tensor_group if sharded else None)
        self.level = level
        return True

    @torch.no_grad()
    def apply_(self, optimizer=None) -> None:
        """Zero the masked weights in the module and in this rank's part of the fp32 master copy."""
        for name, layer in self.layers:
            mask = self.masks.get(name)
            if mask is None:
                continue
            layer.weight.data.mul_(mask)
            if optimizer is None:
                continue
            for view in master_views(optimizer, layer.weight):
                view.mul_(_mask_piece(mask, view, layer.weight).to(view.device))

    def state_dict(self) -> dict:
        """This rank's masks and level, for the checkpoint's client state."""
        return {"level": self.level, "masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``'s masks (the checkpoint of this very layout)."""
        own = {name for name, _ in self.layers}
        masks = state.get("masks", {})
        if masks and set(masks) != own:
            raise ValueError(f"the checkpoint's sparsity masks are of layers {sorted(masks)[:3]}..., this rank "
                             f"sparsifies {sorted(own)[:3]}...; resume with the same model.sparsity")
        device = self.layers[0][1].weight.device if self.layers else "cpu"
        self.masks = {name: mask.to(device=device, dtype=torch.bool) for name, mask in masks.items()}
        self.level = float(state.get("level", 0.0))

    def rank_again(self, step: int) -> None:
        """Masks ranked afresh on the loaded weights for ``step`` (a checkpoint without masks: resharded from
        another layout, or written by a dense run). Weights a sparse run pruned are zero, so they rank
        lowest and the same weights stay pruned; a dense checkpoint is pruned to the schedule's level."""
        self.masks, self.level = {}, 0.0
        self.update(step)

    @torch.no_grad()
    def record(self, device) -> dict:
        """Collective over the model group: ``sparsity`` (fraction of zeros in the sparsified matrices,
        read from the weights) and ``nonzero_params`` (the whole model's parameters less those zeros)."""
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for _, layer in self.layers:
            counts[0] += (layer.weight == 0).sum()
            counts[1] += layer.weight.numel()
        if self.model_group is not None and dist.get_world_size(self.model_group) > 1:
            dist.all_reduce(counts, group=self.model_group)
        zeros, total = int(counts[0].item()), int(counts[1].item())
        return {"sparsity": zeros / total if total else 0.0, "nonzero_params": self.parameters - zeros}


def _mask_piece(mask: torch.Tensor, view: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The part of ``mask`` that a master-copy view of ``param`` holds: the whole mask for a view of the
    whole tensor; for a ZeRO 1/2 / BF16_Optimizer fragment (flat), the slice of the flattened mask
    DeepSpeed's fragment address names."""
    if view.shape == mask.shape:
        return mask
    address = param._hp_mapping.lp_fragment_address  # DeepSpeed's (start, numel) of the piece in the param
    return mask.flatten().narrow(0, address.start, address.numel).reshape(view.shape)


def sparsify_in_step(engine, sparsity: Sparsity) -> None:
    """After each optimizer step (after the clip and clamp wrappers), zero the masked weights, module
    and master copy, then set the masks the schedule asks for (from those weights) and zero again where
    they changed. ``engine.global_steps`` counts the steps
    before this one (DeepSpeed raises it after the optimizer's step), skipped ones included, as the
    loop's step does."""
    step = engine.optimizer.step

    def step_then_sparsify(*args, **kwargs):
        out = step(*args, **kwargs)
        sparsity.apply_(engine.optimizer)  # undo the step's update of the pruned weights
        if sparsity.update(engine.global_steps + 1):  # ranked on the masked weights: the pruned set only grows
            sparsity.apply_(engine.optimizer)
        return out

    engine.optimizer.step = step_then_sparsify


def restore_masks(sparsity: Sparsity, client: dict, step: int, optimizer=None) -> None:
    """After a resume at ``step``: the masks this rank's checkpoint file holds (the same layout), or,
    where it holds none (a checkpoint resharded from another layout, or written dense), masks ranked
    afresh on the loaded weights (``Sparsity.rank_again``); the weights are masked with them (module and
    ``optimizer``'s master copy: a no-op for weights that were saved masked)."""
    state = client.get(STATE_KEY)
    if state is not None:
        sparsity.load_state_dict(state)
    else:
        sparsity.rank_again(step)
    sparsity.apply_(optimizer)
