"""One optimizer step, on either kind of DeepSpeed engine.

``optimizer_step`` is the one step function: when the objective needs the whole step's
micro-batches first (``Objective.whole_batch``: CLIP's contrastive loss under accumulation) it
fetches them and runs a forward-only collecting pass, then it trains. What differs between
engines sits behind the small ``StepEngine`` protocol:

- ``PlainSteps`` (``parallel.pipe=1``, ZeRO 0-3): forward, backward and ``engine.step()`` per
  micro-batch; DeepSpeed scales each loss by 1 / accumulation and steps on the last.
- ``PipelineSteps`` (``parallel.pipe>1``): DeepSpeed runs the micro-batches through the stages
  (1F1B) and returns the loss averaged over micro-batches and data ranks on every stage; only
  the first and last stage read data.

A micro-batch is (model inputs (a tuple), loss target, noise keys): the keys (int64 (B,),
``models/noise.py``) make dropout and drop-path draw the masks one process draws, in any layout.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as dist

from vitscale.train.objective import Objective
from vitscale.train.optim import grad_norm_fp32


class StepEngine(Protocol):
    """What one optimizer step needs of an engine."""

    reads_data: bool  # whether this rank consumes micro-batches (a pipeline's inner stages do not)

    def train_batch(self, batches: Iterator[tuple], measure_norm: bool) -> torch.Tensor:
        """Forward, backward and the optimizer step over the step's micro-batches (model inputs,
        target, noise keys); the loss as a device scalar. ``measure_norm``: a log step wants the
        gradient norm."""

    def forward_only(self, batches: list[tuple]) -> None:
        """Run ``batches`` forward through the objective without gradients."""

    def mean_loss(self, loss: torch.Tensor) -> float:
        """Collective: ``train_batch``'s loss averaged over the data-parallel ranks."""

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step (None where nothing reports one)."""


class PlainSteps:
    """A plain DeepSpeed engine (one model replica per data rank, any ZeRO stage).

    Args:
        engine: the engine.
        objective: the loss (``train/objective.py``).
        accum: micro-batches per optimizer step.
        dims: the layout (the gradient norm of a tensor-parallel model sums over its shards).
        own_norm: DeepSpeed reports no gradient norm (fp32 without ZeRO): compute it here.
        timed: a context manager around each forward pass (``ThroughputMeter.forward``).
    """

    reads_data = True

    def __init__(self, engine, objective: Objective, accum: int, dims, own_norm: bool,
                 timed: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.engine, self.objective, self.accum, self.dims = engine, objective, accum, dims
        self.own_norm, self.timed = own_norm, timed
        self._norm: float | None = None

    def train_batch(self, batches: Iterator[tuple], measure_norm: bool) -> torch.Tensor:
        losses, self._norm = [], None
        for micro in range(self.accum):
            inputs, target, keys = next(batches)
            with self.timed():
                loss = self.objective(self.engine(*inputs, noise=keys), target)
            self.engine.backward(loss)
            if measure_norm and self.own_norm and micro == self.accum - 1:
                self._norm = grad_norm_fp32(self.engine.module, self.dims)  # before the step clears the gradients
            self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def forward_only(self, batches: list[tuple]) -> None:
        with torch.no_grad():
            for inputs, target, keys in batches:
                self.objective(self.engine(*inputs, noise=keys), target)

    def mean_loss(self, loss: torch.Tensor) -> float:
        dist.all_reduce(loss, group=self.dims.data_group())
        return loss.item() / self.dims.data

    def grad_norm(self) -> float | None:
        return self._norm if self._norm is not None else self.engine.get_global_grad_norm()


class PipelineSteps:
    """A DeepSpeed ``PipelineEngine``: this rank is one stage.

    Args:
        engine: the engine.
        takes_noise: the first stage takes (inputs..., noise keys) (``parallelize.pipeline_takes_noise``).
    """

    def __init__(self, engine, takes_noise: bool):
        self.engine, self.takes_noise = engine, takes_noise
        self.reads_data = engine.is_first_stage() or engine.is_last_stage()

    def _wire(self, batches: Iterator[tuple]) -> Iterator[tuple]:
        """Micro-batches as DeepSpeed's pipeline reads them: (first stage's inputs, labels)."""
        for inputs, target, keys in batches:
            inputs = (*inputs, keys) if self.takes_noise else inputs
            yield (inputs[0] if len(inputs) == 1 else inputs), target

    def train_batch(self, batches: Iterator[tuple], measure_norm: bool) -> torch.Tensor:
        return self.engine.train_batch(data_iter=self._wire(batches))

    def forward_only(self, batches: list[tuple]) -> None:
        self.engine.eval_batch(self._wire(iter(batches)), compute_loss=True, bcast_loss=False)

    def mean_loss(self, loss: torch.Tensor) -> float:
        return loss.item()  # already the data-parallel mean, on every stage

    def grad_norm(self) -> float | None:
        norm = getattr(self.engine, "vitscale_grad_norm", None)  # set where we clip (optim.clip_in_step)
        return norm if norm is not None else self.engine.get_global_grad_norm()


def optimizer_step(steps: StepEngine, fetch: Callable[[], tuple], accum: int, objective: Objective,
                   measure_norm: bool = False) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches from ``fetch`` (model inputs, target, noise keys).

    Returns:
        This rank's loss of the step (a device scalar; ``steps.mean_loss`` averages it over ranks).
    """
    if objective.whole_batch:
        batches = [fetch() for _ in range(accum)] if steps.reads_data else []
        objective.collect()
        steps.forward_only(batches)
        objective.train()
        return steps.train_batch(iter(batches), measure_norm)
    return steps.train_batch(iter(fetch, None), measure_norm)  # fetch never returns None: an endless stream
