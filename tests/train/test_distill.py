"""Distillation (train.distill, train/distill.py): the student moves toward a frozen teacher.

In-process and seconds: a teacher of another depth from a weights file, a student trained with the
real objective and the real fetch wrapper for a few AdamW steps on one batch. The runs in every
layout (the teacher a ZeRO-1 run folder, alpha=1 against a run without distillation, tensor 2 and
ZeRO-3 against one process) are in tests/train/test_parallel.py's launches; its tensor-2 layout trains
through ``train_with_frozen_check`` below.
"""
import pytest
import torch
from safetensors.torch import save_file

from vitscale.config import ConfigError
from vitscale.experiment import load_experiment
from vitscale.models import create_model
from vitscale.train.distill import Distillation, build_teacher, distill_loss, resolve_teacher, with_teacher
from vitscale.train.objective import build_objective

from tests.conftest import ROOT, TINY

SMALL = ["data.image_size=32", "model.depth=4", "model.patch_size=8", "model.embed_dim=64"]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors (tests/conftest.py)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A teacher of depth 2 (the student has 4) with timm's names, trained by nobody: a fixed random function."""
    torch.manual_seed(11)
    teacher = create_model("vit_tiny_patch16", img_size=32, patch_size=8, num_classes=10, depth=2, num_heads=4,
                           embed_dim=64)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(teacher.state_dict(), path)
    return path


def _experiment(teacher_file, *overrides):
    return load_experiment(TINY, SMALL + [f"train.distill.teacher={teacher_file}", "train.distill.model={depth: 2}",
                                          *overrides])


def _train_student(exp, steps: int):
    """A few AdamW steps of the student on one fixed batch through the real objective and fetch wrapper;
    returns (teacher, the logged parts of each step, the teacher's weights before)."""
    d = exp.cfg.train.distill
    teacher = build_teacher(resolve_teacher(exp), None, torch.float32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.manual_seed(0)
    student = exp.model.create()
    objective = Distillation(build_objective(exp.cfg, "classifier"), d.kind, d.temperature, d.alpha, accum=1)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    prepare = with_teacher(lambda batch: ((batch,), labels), teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    parts = []
    for _ in range(steps):
        inputs, target = prepare(images)
        loss = objective(student(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        parts.append(objective.metrics(None))
    return teacher, parts, before, (student, images, labels)


def test_student_moves_toward_a_frozen_teacher_of_another_depth(teacher_file):
    exp = _experiment(teacher_file, "train.distill.alpha=0", "train.distill.temperature=2")
    teacher, parts, before, _ = _train_student(exp, steps=12)
    assert len(teacher.blocks) == 2 and exp.model.arch.depth == 4  # another depth loaded
    kl = [p["loss_distill"] for p in parts]
    assert kl[-1] < 0.3 * kl[0], f"KL to the teacher did not fall: {kl}"
    # Frozen: bit-identical weights, no gradient ever, eval mode.
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_hard_distillation_learns_the_teachers_argmax(teacher_file):
    exp = _experiment(teacher_file, "train.distill.alpha=0", "train.distill.kind=hard")
    teacher, parts, _, (student, images, _) = _train_student(exp, steps=25)
    with torch.no_grad():
        agree = (student.eval()(images).argmax(-1) == teacher(images).argmax(-1)).float().mean()
    assert agree == 1.0, f"the student agrees with the teacher's argmax on {agree:.2f} of the batch"
    assert parts[-1]["loss_distill"] < parts[0]["loss_distill"]


def test_alpha_one_is_the_label_loss_exactly(teacher_file):
    """alpha=1 must train what a run without a teacher trains: the same loss, bit for bit, and the same
    gradients (the run-level comparison is in test_parallel.py)."""
    exp = _experiment(teacher_file, "train.distill.alpha=1")
    teacher = build_teacher(resolve_teacher(exp), None, torch.float32)
    torch.manual_seed(0)
    student = exp.model.create()
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain = build_objective(exp.cfg, "classifier")
    distilled = Distillation(plain, "soft", 1.0, 1.0, accum=1)
    grads = []
    for objective, target in ((plain, labels), (distilled, (labels, teacher(images)))):
        student.zero_grad()
        loss = objective(student(images), target)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    assert distilled.metrics(None)["loss_distill"] > 0  # the teacher's term was computed, weighted 0


def test_soft_loss_is_zero_only_at_the_teachers_distribution():
    logits = torch.randn(4, 10)
    assert float(distill_loss(logits, logits, "soft", 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(logits + torch.randn(4, 10), logits, "soft", 3.0)) > 1e-3


def test_bad_distillation_configs_are_refused_before_start(teacher_file, tmp_path):
    with pytest.raises(ConfigError, match="parallel.pipe"):
        _experiment(teacher_file, "parallel.pipe=2")
    with pytest.raises(ConfigError, match="alpha"):
        _experiment(teacher_file, "train.distill.alpha=1.5")
    with pytest.raises(ConfigError, match="not a file"):
        _experiment(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="no class probabilities"):
        resolve_teacher(load_experiment(ROOT / "configs" / "clip_tiny.yaml",
                                        [f"train.distill.teacher={teacher_file}"]))
    with pytest.raises(ConfigError, match="classes"):
        resolve_teacher(load_experiment(TINY, ["model.depth=4", "model.name=vit_small_patch16",
                                               f"train.distill.teacher={_other_classes(tmp_path)}"]))


def _other_classes(tmp_path):
    """A run folder whose config says 5 classes (a config is all resolve_teacher reads of a run)."""
    from vitscale.config import dump_config, load_config

    run = tmp_path / "run5"
    (run / "checkpoints" / "step00000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000001")
    (run / "config.yaml").write_text(dump_config(load_config(TINY, ["data.num_classes=5"])))
    return run


def train_with_frozen_check(run):
    """A layout probe (tests/train/layouts.py): train the real run, then check on every rank that its
    teacher is frozen: bit-identical weights, no gradients, and none of its tensors in the optimizer."""
    from vitscale.train.loop import train

    teacher = run.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train(run)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "the teacher's weights changed"
    assert all(p.grad is None for p in teacher.parameters()), "the teacher received gradients"
    optimized = {id(p) for group in run.engine.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}, "the teacher's weights are in the optimizer"
