"""Model + optimizer + ``deepspeed.initialize`` for a given layout."""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule
from torch import nn

from vitscale.config import Config, is_clip, model_kwargs, own_clipping
from vitscale.models import create_model
from vitscale.models.clip import clip_init_weights
from vitscale.models.losses import ClipLoss, sigmoid_cross_entropy
from vitscale.models.tensor_parallel import parallelize_vit
from vitscale.models.vit import init_weights
from vitscale.train.finetune import load_initial_weights

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def build_model(cfg: Config, dims=None, loss_fn: Callable | None = None) -> nn.Module:
    """This rank's part of the model, with the weights the single-process model has.

    pipe = tensor = 1 (or ``dims`` None): the whole model. tensor > 1: every block's
    linears sharded (``tensor_parallel.parallelize_vit``; both CLIP towers alike). pipe >
    1: this rank's stage as a ``PipelineModule`` (``models/pipeline.py``), with ``loss_fn``
    on its last stage. The model is first built on the meta device and only this rank's
    parameters are materialised and initialised, each from (``train.seed``, its name in
    the whole model), so no process ever holds more than its share, and every layout
    starts from the same function.
    """
    with torch.device("meta"):
        model = create_model(cfg.model.name, **model_kwargs(cfg))
    seed, device = cfg.train.seed, dims.device if dims is not None else torch.device("cpu")
    clip = is_clip(cfg)
    shard = None
    if dims is not None and dims.tensor > 1:
        shard = partial(parallelize_vit, rank=dims.tensor_rank, world=dims.tensor, group=dims.tensor_group())
    every = cfg.parallel.activation_checkpoint
    if dims is not None and dims.pipe > 1:
        from vitscale.models.pipeline import build_clip_pipeline, build_vit_pipeline, clip_layers, vit_layers

        build = build_clip_pipeline if clip else build_vit_pipeline
        module = build(model, dims.grid._topo, dims.stage, seed, loss_fn, device, cfg.parallel.partition, every,
                       shard)
        if cfg.model.init:
            with torch.device("meta"):
                whole = create_model(cfg.model.name, **model_kwargs(cfg))
            prefixes = [prefix for prefix, _ in (clip_layers(whole) if clip else vit_layers(whole))]
            load_initial_weights(module, cfg.model.init, prefixes, whole=whole)
        return module
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    if clip:
        clip_init_weights(model, model.cfg, seed)
    else:
        init_weights(model, seed)
    model.set_grad_checkpointing(every)
    if cfg.model.init:
        load_initial_weights(model, cfg.model.init)
    return model


class WholeBatchContrastive:
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
    which ``_scale_grad`` undoes without changing the loss value that is logged. Costs one
    extra forward pass per step when accumulating, none otherwise. Works in the plain engine
    (``loop.train_step``) and as a pipeline's ``loss_fn`` (``loop.pipeline_step`` runs
    DeepSpeed's ``eval_batch`` to collect, then ``train_batch``).

    Args:
        loss: ``(image features, text features, logit scale) -> loss`` (``models.losses.ClipLoss``).
        accum: micro-batches per optimizer step on this rank.
    """

    def __init__(self, loss: Callable, accum: int):
        self.loss, self.accum = loss, accum
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
        image, text, scale = outputs
        image, text, scale = image.float(), text.float(), scale.float().clamp(max=100.0)  # open_clip's clamp
        if self.accum == 1:
            return self.loss(image, text, scale)
        if self.collecting:
            self._cache.append((image.detach(), text.detach()))
            return scale * 0.0  # a placeholder with a graph; nothing is trained on it
        i, self._next = self._next, self._next + 1
        images = torch.cat([image if j == i else cached[0] for j, cached in enumerate(self._cache)])
        texts = torch.cat([text if j == i else cached[1] for j, cached in enumerate(self._cache)])
        return self._scale_grad(self.loss(images, texts, scale))

    def _scale_grad(self, loss: torch.Tensor) -> torch.Tensor:
        # Value of ``loss``, gradient x accum: DeepSpeed divides every micro-batch's loss by
        # the accumulation count, but each pass here carries a whole-batch loss.
        return loss + (self.accum - 1) * (loss - loss.detach())


def build_loss(cfg: Config, dims=None, accum: int = 1) -> Callable:
    """``(model outputs, target) -> loss`` of the task: softmax or sigmoid (``train.loss``)
    cross-entropy of a classifier's logits (per image slot of packed sequences), or CLIP's contrastive loss over the data-parallel group (each rank's images
    against all texts and vice versa, gradients through the gather; ``models.losses.ClipLoss``)
    and over all ``accum`` micro-batches of a step (``WholeBatchContrastive``), with the
    logit scale clamped at 100 as open_clip does (as a clamp in the loss rather than on the
    parameter, which under ZeRO lives in the optimizer's master copy)."""
    if is_clip(cfg):
        group = dims.data_group() if dims is not None and dims.data > 1 else None
        return WholeBatchContrastive(ClipLoss(local_loss=True, group=group), accum)
    smoothing, sigmoid = cfg.train.label_smoothing, cfg.train.loss == "sigmoid"
    from timm.loss import SoftTargetCrossEntropy

    soft_target = SoftTargetCrossEntropy()  # Mixup / CutMix targets (finetune.BatchAugment), smoothing folded in

    def classification_loss(logits, labels):
        if labels.dim() == 2 and logits.dim() == 2:
            return soft_target(logits.float(), labels.float())
        if logits.dim() == 3:  # packed sequences: (B, K, classes) per image slot; labels (B, slots), -1 = empty
            labels = labels[:, :logits.shape[1]].flatten()
            keep = labels >= 0
            logits, labels = logits.flatten(0, 1)[keep], labels[keep]
        if sigmoid:
            return sigmoid_cross_entropy(logits.float(), labels, smoothing)
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)

    return classification_loss


def layer_decay_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float,
                       skip: set[str]) -> list[dict]:
    """timm's ``param_groups_layer_decay`` (BEiT / DeiT fine-tuning): block ``i`` of ``L`` trains at
    ``lr * layer_decay ** (L + 1 - i)``, the embeddings lowest, the head at ``lr``; weight decay as in
    ``param_groups``. timm writes the factor as ``lr_scale`` for its own schedulers; ours is a
    ``LambdaLR`` over each group's initial lr, so the factor goes into each group's ``lr``."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group.pop("lr_scale", 1.0)
        group.pop("param_names", None)
    return groups


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms (all 1-D tensors) and the parameters in
    ``skip`` (default: the model's ``no_weight_decay()``: position embeddings, class token,
    ...), as in timm / open_clip and the DeiT / FDSL recipes. Names are those of the whole
    model; a pipeline stage's ``"<layer index>."`` prefix is ignored."""
    if skip is None:
        skip = set(getattr(model, "no_weight_decay", lambda: {"pos_embed", "cls_token"})())
    piped = isinstance(model, PipelineModule)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = name.split(".", 1)[1] if piped else name
            (no_decay if p.ndim <= 1 or whole in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: Config, dims, ds_config: dict, loss_fn: Callable | None = None):
    """``deepspeed.initialize`` on the model, with our grid as ``mpu``.

    Args:
        cfg: the experiment.
        dims: ``ParallelDims`` from ``vitscale.distributed.init_distributed``.
        ds_config: from ``vitscale.config.compose_ds_config``.
        loss_fn: ``build_loss``'s; a pipeline computes it on its last stage.

    Returns:
        The DeepSpeed engine (its ``.module`` is the model).
    """
    import deepspeed

    if dims.is_main:  # before building: a large model's count should show before its memory is spent
        logger.info("model %s: %s parameters, pipe %d x tensor %d x data %d, ZeRO-%d, %s", cfg.model.name,
                    _human(model_parameters(cfg)), dims.pipe, dims.tensor, dims.data, cfg.parallel.zero,
                    cfg.train.precision)
    model = build_model(cfg, dims, loss_fn)
    if dims.is_node_main:
        logger.info("rank %d holds %s parameters", dims.rank, _human(sum(p.numel() for p in model.parameters())))
    o, t = cfg.optim, cfg.train

    def schedule(optimizer):  # DeepSpeed calls it with the optimizer it built
        ratio = lambda i: lr_lambda(i, t.steps, o.warmup_steps, o.schedule, o.warmup_init_ratio,  # noqa: E731
                                    o.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)

    # A PipelineModule brings its own grid (built from the same topology); DeepSpeed
    # refuses a second one as mpu.
    mpu = None if dims.pipe > 1 else dims.grid
    groups = (layer_decay_groups(model, o.weight_decay, t.lr, o.layer_decay, no_decay_names(cfg)) if o.layer_decay < 1
              else param_groups(model, o.weight_decay, no_decay_names(cfg)))
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu, lr_scheduler=schedule,
                                           model_parameters=groups)
    if own_clipping(cfg):
        clip_in_step(engine, model, dims, o.grad_clip)
    return engine


def clip_in_step(engine, model: nn.Module, dims, max_norm: float) -> None:
    """Compute the global gradient norm (and clip to ``max_norm`` > 0) right before each
    optimizer step, where DeepSpeed's own fp32 clipping miscounts pipeline stages (see
    ``vitscale.config.compose_ds_config``). The norm is kept as ``engine.vitscale_grad_norm``
    for the logs. Same arithmetic as DeepSpeed's: scale by max_norm / (norm + 1e-6) when below 1."""
    step = engine.optimizer.step

    def clipped_step(*args, **kwargs):
        norm = grad_norm_fp32(model, dims)
        engine.vitscale_grad_norm = norm
        coef = max_norm / (norm + 1e-6)
        if max_norm > 0 and coef < 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
        return step(*args, **kwargs)

    engine.optimizer.step = clipped_step


def lr_lambda(i: int, steps: int, warmup: int, schedule: str = "cosine", init_ratio: float = 0.0,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for step ``i + 1`` (``i`` steps done).

    Linear warm-up reaches the peak at step ``warmup``; cosine then decays to
    ``min_ratio`` at the last step (``constant`` stays at the peak).
    """
    if i < warmup:
        return init_ratio + (1.0 - init_ratio) * (i + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (i + 1 - warmup) / max(1, steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def grad_norm_fp32(model: nn.Module, dims=None) -> float:
    """Global 2-norm of the (already data-parallel averaged) gradients.

    DeepSpeed reports the norm for its ZeRO / bf16 / fp16 optimizers but not for
    plain fp32 without ZeRO, so we compute it there, before the step clears them.
    With pipe or tensor > 1 each rank holds part of the model: squares are summed over
    the model-parallel group, counting tensor-sharded parameters on every tensor rank and
    replicated ones once (DeepSpeed's own rule).
    """
    first = dims is None or dims.tensor_rank == 0
    squares = [p.grad.detach().float().square().sum() for p in model.parameters()
               if p.grad is not None and (first or getattr(p, "tensor_model_parallel", False))]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=getattr(dims, "device", "cpu"))
    if dims is not None and dims.pipe * dims.tensor > 1:
        import torch.distributed as dist

        dist.all_reduce(total, group=dims.model_group())
    return total.sqrt().item()


def no_decay_names(cfg: Config) -> set[str]:
    """The whole model's ``no_weight_decay()`` names (every layout decays the same parameters)."""
    with torch.device("meta"):
        return set(create_model(cfg.model.name, **model_kwargs(cfg)).no_weight_decay())


def model_parameters(cfg: Config) -> int:
    """Parameter count of the whole model (all stages and shards), without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(cfg.model.name, **model_kwargs(cfg)).parameters())


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
