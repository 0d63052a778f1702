"""The losses, each registered by name (``create_loss``): a classifier's softmax and sigmoid
cross-entropy, a captioner's next-token cross-entropy (CapPa), and the contrastive (CLIP, Radford et al. 2021) and sigmoid (SigLIP, Zhai et al.
2023) image-text losses over the data-parallel group.

Both losses exchange features between the ranks of one process group, the data-parallel
group of the ``PipelineParallelGrid`` (``ParallelDims.data_group``), never the whole world:
tensor-parallel ranks of one data rank hold identical features, and pipeline stages other
than the last never see any, so a world-wide gather would count samples twice or wait for
ranks that have nothing to send. Point-to-point peers are translated to global ranks
(``dist.get_global_rank``), so any subgroup works.

Gradient convention (what makes data-parallel training equal the single-process run):

* Each of the ``N`` data ranks returns its own loss ``L_r``, chosen so that
  ``mean_r L_r`` is the loss of the full batch (the ``N`` local batches concatenated in
  data-rank order) on one process. ``ClipLoss(local_loss=False)`` returns that full-batch
  loss itself on every rank; ``ClipLoss(local_loss=True)`` and ``SigLipLoss`` return this
  rank's rows only (the mean of the per-row losses of the full batch is the mean of the
  ranks' means, because local batches are equal).
* The backward of every exchange sends each feature's gradient back to the rank that
  computed the feature and sums it there, so each rank's parameters receive the gradient
  of ``sum_r L_r`` with respect to its own copy.
* DeepSpeed (like DDP) averages gradients over the data ranks: ``(1/N) grad sum_r L_r``
  is exactly the full-batch gradient, for the towers and for ``logit_scale`` /
  ``logit_bias`` alike. No extra scaling belongs anywhere.

For logging, average the returned loss over the data group (``local_loss=False`` returns
the full-batch loss on every rank already). Local batches must have equal size on all
data ranks (``all_gather`` and the label offsets require it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vitscale.registry import Registry

__all__ = ["ClipLoss", "SigLipLoss", "SoftmaxCrossEntropy", "SigmoidCrossEntropy", "CaptioningLoss", "sigmoid_cross_entropy",
           "all_gather_with_grad", "neighbour_exchange_with_grad", "create_loss", "list_losses", "register_loss"]

LOSSES: Registry[nn.Module] = Registry("loss", "list_losses()")


def register_loss(name: str):
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``name``."""
    return LOSSES.register(name)


def list_losses(pattern: str | None = None) -> list[str]:
    """Registered loss names, sorted; ``pattern`` filters with shell wildcards."""
    return LOSSES.names(pattern)


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build a registered loss, e.g. ``create_loss("clip", local_loss=True, group=dims.data_group)``."""
    return LOSSES.build(name, **kwargs)


def _rank_world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank in group, group size); ``group=None`` means no communication at all."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0 (rank order).
    Backward: sum the gradients of the whole output over the ranks and keep this rank's
    slice (a reduce-scatter), so each feature's owner gets every rank's use of it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world, x = dist.get_world_size(group), x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if dist.get_backend(group) in ("nccl", "xccl"):
            out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
            return out, None
        # gloo has no reduce-scatter: all-reduce a copy (autograd may still hold ``grad``).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad.chunk(world, dim=0)[rank].contiguous(), None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather along dim 0.

    Args:
        x: this rank's tensor, ``(b, ...)``; the same shape on every rank of ``group``.
        group: the process group to gather over.

    Returns:
        ``(world * b, ...)``, rank ``r``'s rows at ``r * b``; its gradient reaches each
        owner summed over the ranks.
    """
    return _AllGatherWithGrad.apply(x, group)


def _exchange(tensors: tuple[torch.Tensor, ...], shifts: tuple[int, ...], group) -> tuple[torch.Tensor, ...]:
    """Send ``tensors[i]`` to group rank ``rank + shifts[i]`` and receive, from ``rank - shifts[i]``, the
    tensor that rank sent with the same shift (all in one batch, so no ordering deadlocks)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    received = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors)
    ops = []
    for i, (t, shift) in enumerate(zip(tensors, shifts)):
        # P2POp wants global ranks; the tag tells the two messages apart when left == right (2 ranks).
        dst = dist.get_global_rank(group, (rank + shift) % world)
        ops.append(dist.P2POp(dist.isend, t.contiguous(), dst, group=group, tag=i))
    for i, (r, shift) in enumerate(zip(received, shifts)):
        src = dist.get_global_rank(group, (rank - shift) % world)
        ops.append(dist.P2POp(dist.irecv, r, src, group=group, tag=i))
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    """Forward: ``_exchange``. Backward: each received tensor's gradient goes back to its
    sender (the same exchange with the shifts reversed)."""

    @staticmethod
    def forward(ctx, group, shifts, *tensors):
        ctx.group, ctx.shifts = group, shifts
        return _exchange(tensors, shifts, group)

    @staticmethod
    def backward(ctx, *grads):
        grads = tuple(torch.zeros_like(g) if g is None else g for g in grads)
        return (None, None, *_exchange(grads, tuple(-s for s in ctx.shifts), ctx.group))


def neighbour_exchange_with_grad(tensors: tuple[torch.Tensor, ...], shifts: tuple[int, ...],
                                 group: dist.ProcessGroup) -> tuple[torch.Tensor, ...]:
    """Differentiable ring exchange.

    Args:
        tensors: what this rank sends, one tensor per shift.
        shifts: ``+1`` sends to the right neighbour (group rank + 1), ``-1`` to the left.
        group: the ring's process group (ranks are group ranks, wrapped around).

    Returns:
        For each shift, the tensor received from group rank ``rank - shift``; gradients
        flow back to the senders.
    """
    return _NeighbourExchange.apply(group, tuple(shifts), *tensors)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor, loss: str) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"{loss}: image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must both be (batch, embed_dim) of the same shape; "
                         "pair every image with one caption and project both towers to the same embed_dim")


@register_loss("clip")
class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, features gathered over the data-parallel group.

    ``loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2`` where
    ``logits_per_image = logit_scale * images @ texts.T`` over the global batch and the
    positives are on the diagonal. See the module docstring for the gradient convention.

    Args:
        local_loss: if True, each rank computes only its rows: its images against all
            texts and its texts against all images (labels offset by ``rank * b``), and
            returns their mean; ``mean_r`` of it is the full-batch loss. ``O(b * N b)``
            logits per rank instead of ``O((N b)^2)``. If False (open_clip's default),
            every rank computes the whole ``(N b, N b)`` logit matrix and returns the
            full-batch loss.
        gather_with_grad: if True (default), gradients flow through the gather to the
            features' owners: data-parallel training equals the single-process full-batch
            run. If False, the gather carries no gradient and each rank's own features enter
            with their local gradient only (open_clip's ``gather_with_grad=False``; saves the
            backward collective): with ``local_loss=False`` the averaged gradient is the
            full-batch gradient divided by ``N``, with ``local_loss=True`` the cross-rank
            terms are missing. Use it only to reproduce such runs.
        group: the data-parallel process group; ``None`` = no communication (one process,
            or evaluation on local features). Pass ``dist.group.WORLD`` for the world.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True,
                 group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.local_loss, self.gather_with_grad, self.group = local_loss, gather_with_grad, group

    def _gather(self, image_features: torch.Tensor, text_features: torch.Tensor):
        rank, world = _rank_world(self.group)
        both = torch.cat([image_features, text_features], dim=1)  # (b, 2D): one collective, not two
        if self.gather_with_grad:
            gathered = all_gather_with_grad(both, self.group)  # (N b, 2D)
        else:
            parts = [torch.empty_like(both) for _ in range(world)]
            dist.all_gather(parts, both.detach().contiguous(), group=self.group)
            parts[rank] = both  # this rank's features keep their gradient
            gathered = torch.cat(parts, dim=0)
        dim = image_features.shape[1]
        return gathered[:, :dim], gathered[:, dim:]

    def get_logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
                   logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's logits (also for zero-shot / retrieval scoring with ``group=None``).

        Args:
            image_features, text_features: ``(b, D)``, L2-normalised, row ``i`` of each a pair.
            logit_scale: the temperature, already exponentiated (a scalar tensor).

        Returns:
            ``(logits_per_image, logits_per_text)``: ``(b, N b)`` each with ``local_loss``
            (this rank's rows against the global batch), else ``(N b, N b)`` each; with
            ``N = 1`` both are ``(b, b)``.
        """
        _check_features(image_features, text_features, "ClipLoss")
        rank, world = _rank_world(self.group)
        if world == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            return logits_per_image, logits_per_image.T
        all_images, all_texts = self._gather(image_features, text_features)
        if self.local_loss:
            return logit_scale * image_features @ all_texts.T, logit_scale * text_features @ all_images.T
        logits_per_image = logit_scale * all_images @ all_texts.T
        return logits_per_image, logits_per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        """This rank's loss (``mean`` over the data ranks = the full-batch loss).

        Args:
            image_features, text_features: ``(b, D)``, L2-normalised, row ``i`` of each a pair.
            logit_scale: the temperature, already exponentiated (a scalar tensor).

        Returns:
            A scalar.
        """
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        rank, world = _rank_world(self.group)
        rows = logits_per_image.shape[0]
        offset = rank * rows if self.local_loss and world > 1 else 0  # local rows sit at rank * b globally
        labels = torch.arange(offset, offset + rows, device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


@register_loss("siglip")
class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with the paper's chunked exchange between data ranks.

    Every (image, text) pair of the global batch is a binary problem, positive on the
    diagonal: ``loss_r = -1/b * sum_{i local, j global} log sigmoid(z_ij (t x_i . y_j + bias))``
    with ``z_ij = +1`` for a pair, ``-1`` otherwise. Each rank first scores its images
    against its own texts, then passes text chunks around the ring (to both neighbours at
    once, as the paper and open_clip's ``bidir``), adding the negative-only terms for each
    chunk received; after ``N - 1`` chunks every image has met every text. Gradients of the
    received chunks return to their owners. ``mean_r loss_r`` is the full-batch loss
    (normalised by the global batch, as the paper) and the gradient convention of the
    module docstring holds.

    Args:
        group: the data-parallel process group; ``None`` = no communication.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.group = group

    @staticmethod
    def get_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor) -> torch.Tensor:
        """``(b_img, b_txt)`` logits ``logit_scale * images @ texts.T + logit_bias``."""
        return logit_scale * image_features @ text_features.T + logit_bias

    def _chunk_loss(self, image_features, text_features, logit_scale, logit_bias, positives: bool):
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)  # (b, b)
        signs = -torch.ones_like(logits)
        if positives:
            signs = signs + 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
        """This rank's loss (``mean`` over the data ranks = the full-batch loss).

        Args:
            image_features, text_features: ``(b, D)``, L2-normalised, row ``i`` of each a pair.
            logit_scale: the temperature, already exponentiated (paper init: 10).
            logit_bias: the learnable bias (paper init: -10).

        Returns:
            A scalar.
        """
        _check_features(image_features, text_features, "SigLipLoss")
        loss = self._chunk_loss(image_features, text_features, logit_scale, logit_bias, positives=True)
        _, world = _rank_world(self.group)
        if world == 1:
            return loss
        # Round k receives the texts of the ranks k to the left and k to the right; an even N
        # ends with one single-direction step for the rank opposite on the ring.
        to_right = to_left = text_features
        for _ in range((world - 1) // 2):
            from_left, from_right = neighbour_exchange_with_grad((to_right, to_left), (+1, -1), self.group)
            for chunk in (from_left, from_right):
                loss = loss + self._chunk_loss(image_features, chunk, logit_scale, logit_bias, positives=False)
            to_right, to_left = from_left, from_right  # pass each chunk on in the direction it travels
        if (world - 1) % 2:
            (from_left,) = neighbour_exchange_with_grad((to_right,), (+1,), self.group)
            loss = loss + self._chunk_loss(image_features, from_left, logit_scale, logit_bias, positives=False)
        return loss


def sigmoid_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sigmoid (multi-label) cross-entropy of a classifier, as big_vision's ``sigmoid_xent``
    that ViT-22B trains with: every class an independent binary problem, summed over
    classes, averaged over samples.

    Args:
        logits: (B, C).
        labels: (B,) class indices (one positive each) or (B, C) multi-hot targets in [0, 1].
        label_smoothing: targets become ``t (1 - s) + s / C``.

    Returns:
        A scalar.
    """
    targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype) if labels.dim() == 1 else labels.to(logits.dtype)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()


# -- a classifier's losses --------------------------------------------------------------------------

def _per_image(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (NaViT) give logits per image slot, (B, K, C), and labels (B, slots) with -1
    for empty slots: flatten to the images that exist. Plain (B, C) logits pass unchanged."""
    if logits.dim() == 3:
        labels = labels[:, :logits.shape[1]].flatten()
        keep = labels >= 0
        return logits.flatten(0, 1)[keep], labels[keep]
    return logits, labels


@register_loss("softmax")
class SoftmaxCrossEntropy(nn.Module):
    """Softmax cross-entropy of a classifier's logits (computed in fp32).

    Targets are class indices (B,), per image slot of packed sequences, or soft targets (B, C)
    from Mixup / CutMix, which already hold the label smoothing (timm's ``SoftTargetCrossEntropy``).

    Args:
        label_smoothing: for class-index targets, as ``F.cross_entropy``'s.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() == 2 and logits.dim() == 2:  # soft targets
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits.float(), labels.float())
        logits, labels = _per_image(logits, labels)
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)


@register_loss("sigmoid")
class SigmoidCrossEntropy(nn.Module):
    """Sigmoid (multi-label) cross-entropy of a classifier's logits (``sigmoid_cross_entropy``,
    computed in fp32), per image slot of packed sequences as the softmax one.

    Args:
        label_smoothing: targets become ``t (1 - s) + s / C``.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = _per_image(logits, labels)
        return sigmoid_cross_entropy(logits.float(), labels, self.label_smoothing)



# -- a captioner's loss ------------------------------------------------------------------------------

@register_loss("captioning")
class CaptioningLoss(nn.Module):
    """Next-token cross-entropy of a captioner (CapPa), per sample (computed in fp32).

    Position t of the logits predicts token t + 1 of the caption; the first token (start of text) is
    never a target, and padding targets are ignored. Each sample's loss is the mean over its caption's
    targets, so a sample counts alike whatever its length, and the mean over samples of equal-sized
    micro-batches is the batch's whatever the layout.

    Args:
        pad_id: the padding token id (``data.captions.CaptionTokenizer``: 0).
    """

    def __init__(self, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) and the caption's token ids (B, L) -> per-sample losses (B,)."""
        targets = tokens[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, L - 1)
        kept = (targets != self.pad_id).to(per_token.dtype)
        return (per_token * kept).sum(1) / kept.sum(1).clamp(min=1.0)
