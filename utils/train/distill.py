"""Distillation for QAT (--qat-distill): the float model the run starts from is the teacher, and a loss
pulls the quantized student's raw Detect maps toward the teacher's on the same images.

Per map (batch, anchors, y, x, 5 + classes):
- objectness: the Bernoulli KL divergence from the teacher's probability to the student's;
- classes: the same per class, weighted by the teacher's objectness (class scores matter where it
  sees an object);
- boxes: squared difference of the sigmoid box outputs (what YOLOv5 decodes xy and wh from), weighted
  by the teacher's objectness.
Each term is zero when student and teacher maps are equal, so a perfect student pays nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = 1e-9


def _bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(teacher || student) for sigmoid outputs: BCE(student, p) - BCE(teacher, p)."""
    return (F.binary_cross_entropy_with_logits(student_logits, teacher_p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, teacher_p, reduction="none"))


def head_distill_terms(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """(box, obj, cls) distillation terms summed over the detection levels, as a (3,) tensor."""
    terms = torch.zeros(3, device=student[0].device)
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float().detach()
        p = t.sigmoid()
        weight = p[..., 4:5]
        norm = weight.sum() + _EPS
        box = ((s.sigmoid()[..., :4] - p[..., :4]) ** 2 * weight).sum() / (norm * 4)  # same kernel as p
        obj = _bernoulli_kl(s[..., 4], t[..., 4], p[..., 4]).mean()
        cls = torch.zeros((), device=s.device)
        if s.shape[-1] > 5:
            cls = (_bernoulli_kl(s[..., 5:], t[..., 5:], p[..., 5:]) * weight).sum() / (norm * (s.shape[-1] - 5))
        terms = terms + torch.stack((box, obj, cls))
    return terms


class HeadDistillation:
    """``loss(imgs, student_maps)``: the teacher's forward on ``imgs`` (no gradient) and ``gain`` times
    the summed terms, scaled by the batch size like YOLOv5's detection loss.

    The teacher is put in eval mode (running BN statistics, no updates) and returns raw maps.
    """

    def __init__(self, teacher: nn.Module, gain: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher.model[-1].export_raw = True  # Detect returns the raw maps, not decoded boxes
        self.gain = float(gain)

    def __call__(self, imgs: torch.Tensor, student_maps: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            teacher_maps = self.teacher(imgs)
        return head_distill_terms(student_maps, teacher_maps).sum() * (self.gain * imgs.shape[0])


def load_teacher(weights: str, cfg: str, nc: int, hyp: dict, act: str | None, device: torch.device) -> nn.Module:
    """The float teacher from ``weights`` built as train.py builds a model to train (same yaml, classes
    and activation); a QAT checkpoint is refused: the teacher must be the float model."""
    from utils.train.setup import build_model

    try:
        teacher, _ = build_model(weights, cfg, nc, hyp, act, False, device, qat=False)
    except ValueError as e:
        if "QAT" not in str(e):
            raise
        raise ValueError(f"--qat-distill {weights}: is a QAT checkpoint; the teacher must be the float model "
                         "the QAT run started from (give its .pt: --qat-distill FLOAT.pt)") from None
    return teacher
