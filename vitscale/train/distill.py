"""Knowledge distillation (``train.distill``; Hinton et al. 2015, as ViT-22B distils its students): a
frozen teacher runs forward on every micro-batch the student sees, and the student minimises

    alpha * label loss + (1 - alpha) * distillation loss,

the distillation loss being ``soft``: KL(teacher softmax(z_t / T) || student softmax(z_s / T)) x T^2
(the T^2 keeps the gradient's scale as T changes, Hinton et al. section 2), or ``hard``: cross-entropy
to the teacher's argmax (DeiT's hard distillation, Touvron et al. 2021, without its extra token).

The teacher is resolved before any process starts (``resolve_teacher``: a vitscale run or checkpoint
folder of any layout, its architecture from the run's own ``config.yaml``; or a state-dict file with
our (= timm's) names, its architecture the student's model section with ``train.distill.model``'s
keys replaced), and built on every rank (``build_teacher``): read once per node, replicated whole on
every rank (tensor ranks too: the teacher runs no backward, so sharding it would save memory only;
a replicated teacher is the simple, layout-independent choice), in eval mode, its parameters without
gradients and outside DeepSpeed's engine (not in the optimizer, not in ZeRO's partitions, not in the
student's checkpoints). It runs inside ``fetch`` (``with_teacher``), so its logits travel with the
labels as the loss target; its forward time is in the step time, and its FLOPs are counted apart in
the throughput records (``throughput.py``: ``teacher_*`` fields; ``mfu`` counts the student alone).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitscale.config import ConfigError
from vitscale.experiment import Experiment
from vitscale.models.spec import ModelSpec, resolve_model
from vitscale.train.checkpoint import find_checkpoint, load_run
from vitscale.train.faults import nonfinite_spreads
from vitscale.train.initial_weights import adapt_state_dict, read_state_dict
from vitscale.train.node_reads import read_once_per_node
from vitscale.train.objective import Objective

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Teacher:
    """The teacher a run distils from, resolved before any process starts."""

    path: str  # train.distill.teacher
    spec: ModelSpec  # its architecture, at the student's image size

    @property
    def forward_flops(self) -> int:
        """Forward FLOPs per sample (it runs no backward)."""
        return self.spec.forward_flops()


def resolve_teacher(exp: Experiment) -> Teacher | None:
    """The teacher ``train.distill`` names, checked against the student (``None`` without one).

    Raises:
        ConfigError: a CLIP student, a teacher that is no classifier, another class count, a run
            folder without checkpoints; the message names the key and the fix.
    """
    cfg, d = exp.cfg, exp.cfg.train.distill
    if d.teacher is None:
        return None
    if exp.model.kind != "classifier":
        raise ConfigError(f"train.distill distils a ViT classifier; model.name={cfg.model.name} trains as a "
                          f"{exp.model.kind} (a CLIP / CapPa objective has no class probabilities to match a "
                          "teacher's): unset train.distill.teacher")
    path = Path(d.teacher)
    if path.is_dir():
        run_dir = path if (path / "config.yaml").is_file() else path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"train.distill.teacher={d.teacher} is a folder but no vitscale run or checkpoint "
                              "folder (no config.yaml); give a run.dir of a finished run or a weights file")
        if run_dir == path:
            find_checkpoint(run_dir)  # FileNotFoundError naming the folder if the run saved none
        teacher_run = load_run(run_dir)
        model_cfg, classes, loss = teacher_run.cfg.model, teacher_run.cfg.data.num_classes, teacher_run.cfg.train.loss
    else:
        model_cfg = dataclasses.replace(cfg.model, init=None)
        for key, value in (d.model or {}).items():
            if key not in {f.name for f in dataclasses.fields(model_cfg)} or key == "init":
                raise ConfigError(f"train.distill.model.{key} is not a model-section key (e.g. name, depth, "
                                  "embed_dim, num_heads)")
            setattr(model_cfg, key, value)
        classes, loss = cfg.data.num_classes, cfg.train.loss
    model_cfg = dataclasses.replace(model_cfg, init=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    try:
        spec = resolve_model(model_cfg, cfg.data.image_size, classes, loss)
    except ConfigError as e:
        raise ConfigError(f"train.distill.teacher={d.teacher}: {e}") from None
    if spec.kind != "classifier":
        raise ConfigError(f"train.distill.teacher={d.teacher} is a {spec.name} (a CLIP); the teacher must be a ViT "
                          "classifier of the student's classes")
    if classes != cfg.data.num_classes:
        raise ConfigError(f"train.distill.teacher={d.teacher} predicts {classes} classes, the student "
                          f"data.num_classes={cfg.data.num_classes}; distil from a teacher of the same classes")
    return Teacher(str(d.teacher), spec)


def build_teacher(teacher: Teacher, dims, dtype: torch.dtype) -> nn.Module:
    """The whole teacher on this rank's device: weights read once per node (collective over all ranks
    when ``dims`` is a distributed layout), frozen (eval mode, ``requires_grad`` off), in ``dtype``.
    Built on the meta device and materialised from the file, so it draws nothing from torch's RNG
    (a run with a teacher draws what the same run without one draws)."""
    with read_once_per_node(lambda: read_state_dict(teacher.path), dims, "distill_teacher") as state:
        model = teacher.spec.meta()
        whole = {k: v.shape for k, v in model.state_dict().items()}
        state = adapt_state_dict(state, whole, int(bool(model.cfg.class_token)))  # another grid: pos_embed resampled
        if any(v is None for v in state.changed.values()):  # a head of another class count was dropped
            raise ValueError(f"train.distill.teacher={teacher.path}: its classifier head does not fit "
                             f"{teacher.spec.arch.num_classes} classes; distil from a teacher of the student's classes")
        missing, unexpected = sorted(set(whole) - set(state)), sorted(set(state) - set(whole))
        if missing or unexpected:
            raise ValueError(f"train.distill.teacher={teacher.path} does not fit {teacher.spec.name}: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; a weights file needs train.distill.model "
                             "to describe its architecture (e.g. {name: vit_small_patch16, depth: 12})")
        model.to_empty(device=dims.device if dims is not None else torch.device("cpu"))
        try:
            model.load_state_dict({k: state[k] for k in whole}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"train.distill.teacher={teacher.path} does not fit {teacher.spec.name}: {e}. A weights "
                             "file needs train.distill.model to describe its architecture") from None
    model.to(dtype).eval().requires_grad_(False)
    if dims is None or dims.is_main:
        logger.info("distilling from %s (%s, %d blocks, %.2fM parameters), frozen and replicated on every rank",
                    teacher.path, teacher.spec.name, teacher.spec.arch.depth, teacher.spec.parameters / 1e6)
    return model


def with_teacher(prepare: Callable, teacher: nn.Module) -> Callable:
    """``prepare`` (``Batch`` -> (model inputs, target)) with the teacher's logits of the inputs added to the
    target: (inputs, (target, teacher logits)). The teacher sees exactly the images the student sees
    (after Mixup / CutMix and erasing)."""

    def prepared(batch) -> tuple:
        inputs, target = prepare(batch)
        with torch.no_grad():
            logits = teacher(*inputs)
        return inputs, (target, logits)

    return prepared


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """The distillation term of a batch of logits (B, classes), in fp32, averaged over samples.

    Args:
        student: the student's logits (with gradient).
        teacher: the teacher's logits.
        kind: ``soft`` (KL(teacher || student) of the softened distributions x T^2) or ``hard``
            (cross-entropy to the teacher's argmax).
        temperature: T of ``soft``.
    """
    student, teacher = student.float(), teacher.float()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean",
                    log_target=True) * (t * t)


class Distillation(Objective):
    """The student's loss: ``alpha`` x the label loss (the model's own: ``train.loss``, label smoothing,
    Mixup's soft targets) + (1 - ``alpha``) x ``distill_loss``, on targets (labels, teacher logits)
    (``with_teacher``). Both terms of this step's micro-batches are kept for the train record
    (``metrics``: ``loss_label``, ``loss_distill``).

    Args:
        base: the student's objective without a teacher (``objective.build_objective``).
        kind, temperature, alpha: ``train.distill``'s.
        accum: micro-batches per optimizer step on this rank.
    """

    def __init__(self, base: Objective, kind: str, temperature: float, alpha: float, accum: int):
        super().__init__(base.loss)
        self.kind, self.temperature, self.alpha = kind, temperature, alpha
        self._parts: deque[torch.Tensor] = deque(maxlen=accum)  # the step's (label, distill) pairs

    def __call__(self, outputs, target) -> torch.Tensor:
        labels, teacher_logits = target
        label = self.loss(outputs, labels)
        distill = distill_loss(outputs, teacher_logits, self.kind, self.temperature)
        self._parts.append(torch.stack([label.detach().float(), distill.detach()]))
        return nonfinite_spreads(self.alpha * label + (1 - self.alpha) * distill)

    def metrics(self, dims) -> dict:
        """Collective over the data ranks: the last step's ``loss_label`` and ``loss_distill``, averaged."""
        parts = torch.stack(list(self._parts)).mean(dim=0)
        if dims is not None and dims.data > 1:
            torch.distributed.all_reduce(parts, group=dims.data_group())
            parts = parts / dims.data
        return {"loss_label": float(parts[0]), "loss_distill": float(parts[1])}
