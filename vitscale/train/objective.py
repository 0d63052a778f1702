"""What a training step minimises: ``(model outputs, target) -> loss``, built from the loss registry
(``vitscale.models.losses``) for the model's kind.

The loss is the one ``train.loss`` names for the model's kind (``models.spec.resolve_loss``):

- a classifier: ``softmax`` or ``sigmoid`` cross-entropy (``train.label_smoothing``), per image slot
  of packed sequences, soft targets from Mixup / CutMix;
- a CapPa (``train.objective=cappa``): the captions' next-token cross-entropy per sample, by
  autoregressive or parallel prediction as each sample's target says (``CaptioningObjective``);
- a CLIP: the ``clip`` contrastive loss (each rank's images against all texts and vice versa,
  gathered with gradients) or SigLIP's ``siglip`` sigmoid loss (big_vision's chunked exchange of
  texts around the ring, with the model's ``logit_bias``), both over the data-parallel group and over
  all micro-batches of a step (``WholeBatchContrastive``). The logit scale enters as the model gives
  it: its clamp to [0, log 100] is on the parameter after each optimizer step
  (``train/optim.py``'s ``clamp_in_step``), as open_clip_train does, never inside the loss, where it
  would zero the parameter's gradient.

Every objective says whether it needs the whole step's micro-batches first (``whole_batch``):
the step function (``train/step.py``) then runs a forward-only collecting pass. A NaN / Inf loss
gives NaN gradients (``train.faults.nonfinite_spreads``), so that its step is skipped on every
rank even where the gradients alone were finite.
"""
from __future__ import annotations

from typing import Callable

import torch

from vitscale.models.losses import create_loss
from vitscale.train.faults import nonfinite_spreads
from vitscale.models.spec import resolve_loss


class Objective:
    """A loss over one micro-batch at a time: ``collect`` / ``train`` are no-ops."""

    whole_batch = False  # True: the step first runs every micro-batch forward (``collect``), then trains

    def __init__(self, loss: Callable):
        self.loss = loss

    def __call__(self, outputs, target) -> torch.Tensor:
        return nonfinite_spreads(self.loss(outputs, target))

    def collect(self) -> None:
        """Start a step's collecting pass (only objectives with ``whole_batch``)."""

    def train(self) -> None:
        """End the collecting pass: the next calls compute the loss with gradients."""

    def metrics(self, dims) -> dict:
        """Collective over the data ranks where the objective logs terms of its own: extra fields of
        the train record (of the last step). None here."""
        return {}


class CaptioningObjective(Objective):
    """CapPa's loss (Tschannen et al. 2023): the captions' next-token cross-entropy, each sample by the
    branch its target names (``train/captioning.py``: autoregressive or parallel prediction; the model
    ran it so). The loss is the mean of the per-sample losses; each branch's mean is kept for the log
    (``loss_ar``, ``loss_parallel`` over the last step's samples of every data rank).

    Args:
        loss: ``(logits, tokens) -> per-sample losses`` (``models.losses.CaptioningLoss``).
        accum: micro-batches per optimizer step on this rank.
    """

    def __init__(self, loss: Callable, accum: int):
        super().__init__(loss)
        self.accum, self._calls = accum, 0
        self._sums = torch.zeros(4, dtype=torch.float64)  # AR loss sum, AR samples, parallel loss sum, parallel samples

    def __call__(self, outputs, target) -> torch.Tensor:
        tokens, parallel = target
        per_sample = self.loss(outputs, tokens)  # (B,)
        if self._calls % self.accum == 0:  # a new step: its micro-batches' sums start afresh
            self._sums = torch.zeros(4, dtype=torch.float64, device=per_sample.device)
        self._calls += 1
        losses, parallel = per_sample.detach().double(), parallel.to(per_sample.device, torch.bool)
        self._sums += torch.stack([losses[~parallel].sum(), (~parallel).sum().double(), losses[parallel].sum(),
                                   parallel.sum().double()])
        return nonfinite_spreads(per_sample.mean())

    def metrics(self, dims) -> dict:
        sums = self._sums.clone()
        if dims is not None and dims.data > 1:
            torch.distributed.all_reduce(sums, group=dims.data_group())
        ar, n_ar, par, n_par = sums.tolist()
        return {"loss_ar": ar / n_ar if n_ar else None, "loss_parallel": par / n_par if n_par else None,
                "parallel_share": n_par / (n_ar + n_par) if n_ar + n_par else None}


class WholeBatchContrastive(Objective):
    """CLIP's contrastive loss over the whole global batch, also under gradient accumulation
    (open_clip's ``accum_freq`` feature caching), so every layout trains the same function.

    A contrastive loss over each micro-batch alone would depend on the layout: data 2 with
    one micro-batch each contrasts 2 x micro samples, data 1 with two accumulated
    micro-batches contrasts micro samples twice. So with accumulation, a step first runs
    every micro-batch forward without gradients (``collecting``: the features are cached,
    the returned loss is a placeholder), then again with gradients, each time computing the
    loss of the whole batch with this micro-batch's fresh features in place of its cached
    ones. Each pass's gradient reaches only its own micro-batch, so their sum is the
    gradient of the whole-batch loss; DeepSpeed divides each by the accumulation count,
    which ``_scale_grad`` undoes without changing the loss value that is logged. The logit scale
    (and SigLIP's bias) is one parameter of the whole batch, not of a micro-batch: it enters with
    its gradient in one pass only (the last), detached in the others, or it would receive ``accum``
    times the whole-batch gradient (open_clip's ``accum_freq`` does) and data 2 would train a
    different function than data 1 with two micro-batches. Costs one extra forward pass per step
    when accumulating, none otherwise. Works in the plain engine
    and as a pipeline's ``loss_fn`` (``train/step.py`` runs DeepSpeed's ``eval_batch`` to
    collect, then ``train_batch``).

    Args:
        loss: ``(image features, text features, logit scale[, logit bias]) -> loss``
            (``models.losses.ClipLoss`` / ``SigLipLoss``); the model's outputs after the features
            are passed on as they come.
        accum: micro-batches per optimizer step on this rank.
    """

    def __init__(self, loss: Callable, accum: int):
        super().__init__(loss)
        self.accum = accum
        self.whole_batch = accum > 1
        self.collecting = False
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._next = 0

    def collect(self) -> None:
        """Start a step: the next ``accum`` calls cache features."""
        self.collecting, self._cache, self._next = True, [], 0

    def train(self) -> None:
        """After collecting: the next ``accum`` calls compute the loss with gradients."""
        if self._cache and len(self._cache) != self.accum:  # empty on pipeline stages without the loss
            raise RuntimeError(f"collected {len(self._cache)} micro-batches, expected {self.accum}")
        self.collecting, self._next = False, 0

    def __call__(self, outputs, target=None) -> torch.Tensor:
        image, text, *scalars = outputs  # scalars: the logit scale, and SigLIP's logit bias
        image, text, scalars = image.float(), text.float(), [s.float() for s in scalars]
        if self.accum == 1:
            return nonfinite_spreads(self.loss(image, text, *scalars))
        if self.collecting:
            self._cache.append((image.detach(), text.detach()))
            return scalars[0] * 0.0  # a placeholder with a graph; nothing is trained on it
        i, self._next = self._next, self._next + 1
        images = torch.cat([image if j == i else cached[0] for j, cached in enumerate(self._cache)])
        texts = torch.cat([text if j == i else cached[1] for j, cached in enumerate(self._cache)])
        if i != self.accum - 1:  # the whole-batch scalars take their gradient once per step (class docstring)
            scalars = [s.detach() for s in scalars]
        return nonfinite_spreads(self._scale_grad(self.loss(images, texts, *scalars)))

    def _scale_grad(self, loss: torch.Tensor) -> torch.Tensor:
        # Value of ``loss``, gradient x accum: DeepSpeed divides every micro-batch's loss by
        # the accumulation count, but each pass here carries a whole-batch loss.
        return loss + (self.accum - 1) * (loss - loss.detach())


def build_objective(cfg, kind: str, dims=None, accum: int = 1) -> Objective:
    """The objective of a model of ``kind`` (``ModelSpec.kind``) under ``cfg.train``.

    Args:
        cfg: the experiment's config (``train.loss``, ``train.label_smoothing``).
        kind: ``classifier``, ``clip`` or ``cappa``.
        dims: the layout (a CLIP's loss exchanges features over its data-parallel group); None: one process.
        accum: micro-batches per optimizer step on this rank.
    """
    name = resolve_loss(cfg.train.loss, kind)
    if kind == "cappa":
        return CaptioningObjective(create_loss(name), accum)
    if kind == "clip":
        group = dims.data_group() if dims is not None and dims.data > 1 else None
        loss = create_loss("clip", local_loss=True, group=group) if name == "clip" else create_loss(name, group=group)
        return WholeBatchContrastive(loss, accum)
    return Objective(create_loss(name, label_smoothing=cfg.train.label_smoothing))
