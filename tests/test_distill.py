"""Knowledge distillation from the float teacher: the loss, and a run that uses it."""

import json

import torch
import torch.nn.functional as F
from torch import nn

from hmqsearch.lit.distill import Distiller


def _pair() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 5)
    return teacher, torch.randn(16, 6), torch.randint(0, 5, (16,))


def test_alpha_zero_is_cross_entropy():
    teacher, x, y = _pair()
    student = torch.randn(16, 5)
    loss = Distiller(teacher, alpha=0.0, temperature=4.0).loss(student, x, y)
    assert torch.allclose(loss, F.cross_entropy(student, y))


def test_distillation_term_vanishes_when_student_matches_teacher():
    teacher, x, y = _pair()
    d = Distiller(teacher, alpha=1.0, temperature=3.0)
    assert d.loss(teacher(x).detach(), x, y).abs().item() < 1e-6
    assert d.loss(torch.zeros(16, 5), x, y).item() > 1e-3


def test_distillation_gradient_pulls_student_to_teacher_not_teacher_to_student():
    teacher, x, y = _pair()
    student = torch.zeros(16, 5, requires_grad=True)
    Distiller(teacher, alpha=1.0, temperature=2.0).loss(student, x, y).backward()
    with torch.no_grad():
        gap_before = (teacher(x).softmax(1) - student.softmax(1)).abs().sum()
        gap_after = (teacher(x).softmax(1) - (student - 0.5 * student.grad).softmax(1)).abs().sum()
    assert gap_after < gap_before
    assert all(p.grad is None for p in teacher.parameters())


def test_digits_run_with_distillation_keeps_teacher_out_of_checkpoints(train_run):
    _, run_dir = train_run("pretrain.epochs=4", "search.epochs=1", "finetune.epochs=1", "logger=csv",
                           "export.enabled=false", "distill.enabled=true")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quant_top1"] > 50.0
    for stage in ("search", "finetune"):
        state = torch.load(run_dir / "checkpoints" / stage / "last.ckpt", weights_only=False)["state_dict"]
        assert not any("teacher" in k for k in state)
        assert all(k.startswith("model.") or "duals" in k for k in state)
