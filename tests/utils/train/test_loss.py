"""Tests for utils/train/loss.py: CIoU values, target assignment, loss parts and a short fit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.train.loss import ComputeLoss, FocalLoss, bbox_ciou, find_detect, smooth_BCE

HYP = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0)
# v7.0 default anchors in pixels, P3/8, P4/16, P5/32
ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
STRIDES = [8.0, 16.0, 32.0]


class FakeDetect(nn.Module):
    def __init__(self, nc: int, anchors_grid: torch.Tensor, strides=STRIDES):
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = anchors_grid.shape[:2]
        self.register_buffer("anchors", anchors_grid.clone())
        self.stride = torch.tensor(strides)
        self.conv = nn.Conv2d(1, 1, 1)  # gives the model a parameter (and so a device)


class FakeModel(nn.Module):
    def __init__(self, nc: int = 3, anchors_grid: torch.Tensor | None = None, hyp=None):
        super().__init__()
        if anchors_grid is None:
            px = torch.tensor(ANCHORS_PX, dtype=torch.float32).view(3, 3, 2)
            anchors_grid = px / torch.tensor(STRIDES).view(3, 1, 1)
        self.model = nn.Sequential(nn.Identity(), FakeDetect(nc, anchors_grid))
        self.hyp = dict(HYP if hyp is None else hyp)


def _preds(bs: int, nc: int, img: int = 64, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in STRIDES:
        n = int(img / s)
        p = torch.randn(bs, 3, n, n, nc + 5, generator=gen) * 0.5
        out.append(p.requires_grad_(requires_grad))
    return out


# ---------------------------------------------------------------- CIoU
def test_ciou_identical_is_one_and_far_disjoint_negative():
    a = torch.tensor([[5.0, 5.0, 2.0, 3.0]])
    assert bbox_ciou(a, a).item() == pytest.approx(1.0, abs=1e-5)
    far = torch.tensor([[20.0, 5.0, 2.0, 3.0]])
    assert bbox_ciou(a, far).item() < 0
    touching = torch.tensor([[7.0, 5.0, 2.0, 3.0]])  # shares an edge only: iou 0, distance penalty > 0
    assert -1.0 < bbox_ciou(a, touching).item() < 0


def test_ciou_known_values_and_formats_agree():
    # same shape, shifted by half a width: iou 1/3, enclosing 3x2 -> diag^2 13, centre distance^2 1
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert bbox_ciou(a, b, xywh=False).item() == pytest.approx(1 / 3 - 1 / 13, abs=1e-5)
    # nested boxes with different aspect ratio: the atan term is active
    a, b = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 2.0, 1.0]])
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(1.0)) ** 2
    expected = 0.5 - 0.25 / 8 - v * v / (v - 0.5 + 1)
    assert bbox_ciou(a, b, xywh=False).item() == pytest.approx(expected, abs=1e-5)
    xywh_a, xywh_b = torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor([[1.0, 0.5, 2.0, 1.0]])
    assert bbox_ciou(xywh_a, xywh_b).item() == pytest.approx(expected, abs=1e-5)


def test_ciou_alpha_has_no_gradient_path():
    a = torch.tensor([[1.0, 1.0, 2.0, 2.0]], requires_grad=True)
    b = torch.tensor([[1.0, 0.5, 2.0, 1.0]])
    bbox_ciou(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_smooth_bce_and_focal():
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))
    assert smooth_BCE(0.0) == (1.0, 0.0)
    pred, true = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1.0, 0.0, 1.0])
    focal = FocalLoss(nn.BCEWithLogitsLoss(), gamma=0.0, alpha=0.5)
    bce = F.binary_cross_entropy_with_logits(pred, true).item()
    assert focal(pred, true).item() == pytest.approx(0.5 * bce)
    focal2 = FocalLoss(nn.BCEWithLogitsLoss(), gamma=2.0)
    assert focal2(pred, true).item() < focal(pred, true).item()  # easy examples are down-weighted


# ---------------------------------------------------------------- build_targets
def test_build_targets_cells_anchors_and_neighbours():
    anchors = torch.tensor([[[1.25, 1.625], [2.0, 3.75], [10.0, 10.0]]] * 3)  # third anchor too big
    model = FakeModel(nc=3, anchors_grid=anchors)
    loss = ComputeLoss(model)
    # 8x8 grid at level 0: target 0 at (2.4, 4.4) -> own cell + left + up neighbours;
    # target 1 at (6.6, 7.2) -> own cell + right neighbour + up neighbour (no room below)
    targets = torch.tensor([[0, 1, 0.30, 0.55, 0.25, 0.25], [1, 2, 0.825, 0.90, 0.25, 0.25]])
    tcls, tbox, indices, anch = loss.build_targets(_preds(2, 3), targets)
    b, a, gj, gi = indices[0]
    got = sorted(zip(b.tolist(), a.tolist(), gj.tolist(), gi.tolist()))
    cells = {0: [(4, 2), (4, 1), (3, 2)], 1: [(7, 6), (7, 7), (6, 6)]}
    expected = sorted((img, anc, y, x) for img, cl in cells.items() for (y, x) in cl for anc in (0, 1))
    assert got == expected
    assert sorted(tcls[0].tolist()) == [1] * 6 + [2] * 6
    # box targets: xy relative to the assigned cell corner (in [-0.5, 1.5]), wh in grid units
    for k in range(len(b)):
        gx, gy = (2.4, 4.4) if b[k] == 0 else (6.6, 7.2)
        assert tbox[0][k, 0].item() == pytest.approx(gx - gi[k].item(), abs=1e-5)
        assert tbox[0][k, 1].item() == pytest.approx(gy - gj[k].item(), abs=1e-5)
        assert tbox[0][k, 2:].tolist() == pytest.approx([2.0, 2.0])
        assert anch[0][k].tolist() == anchors[0, a[k]].tolist()
    assert (tbox[0][:, :2] >= -0.5).all() and (tbox[0][:, :2] <= 1.5).all()
    # level 2 (2x2 grid): wh 0.5 vs 1.25 ratios fine for anchors 0, 1 only
    assert set(indices[2][1].tolist()) <= {0, 1}


def test_build_targets_anchor_ratio_and_edge_clamp():
    anchors = torch.tensor([[[1.0, 1.0], [4.0, 4.0], [0.25, 0.25]]] * 3)
    loss = ComputeLoss(FakeModel(nc=1, anchors_grid=anchors))
    # wh = 1 cell at level 0: anchor 0 matches (ratio 1); anchors 1 and 2 sit at ratio 4, not < anchor_t
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.125, 0.125]])
    _, _, indices, _ = loss.build_targets(_preds(1, 1), targets)
    assert set(indices[0][1].tolist()) == {0}
    # a centre on the right/bottom border (x = y = 1.0) lands in the last cell, offset 1.0
    targets = torch.tensor([[0, 0, 1.0, 1.0, 0.125, 0.125]])
    _, tbox, indices, _ = loss.build_targets(_preds(1, 1), targets)
    b, a, gj, gi = indices[0]
    assert gi.max().item() == 7 and gj.max().item() == 7 and gi.min().item() >= 0
    own = (gi == 7) & (gj == 7)
    assert torch.allclose(tbox[0][own][:, :2], torch.ones(1, 2))


def test_build_targets_empty():
    loss = ComputeLoss(FakeModel())
    tcls, tbox, indices, anch = loss.build_targets(_preds(2, 3), torch.zeros(0, 6))
    assert all(len(t) == 0 for t in tcls) and all(x.shape == (0, 4) for x in tbox)
    assert all(len(i[0]) == 0 for i in indices)


# ---------------------------------------------------------------- loss values
def test_no_targets_only_objectness():
    loss_fn = ComputeLoss(FakeModel())
    preds = _preds(2, 3)
    total, items = loss_fn(preds, torch.zeros(0, 6))
    assert total.shape == (1,) and items.shape == (3,)
    assert items[0] == 0 and items[2] == 0 and items[1] > 0
    # objectness against all-zero targets, weighted by the per-level balance
    expected = sum(w * F.binary_cross_entropy_with_logits(p[..., 4], torch.zeros_like(p[..., 4]))
                   for w, p in zip([4.0, 1.0, 0.4], preds))
    assert items[1].item() == pytest.approx(expected.item() * HYP["obj"], rel=1e-5)
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-5)


def test_box_and_cls_parts_match_direct_computation():
    model = FakeModel(nc=3)
    loss_fn = ComputeLoss(model)
    preds = _preds(2, 3, seed=1)
    targets = torch.tensor([[0, 1, 0.3, 0.55, 0.25, 0.25], [1, 2, 0.6, 0.4, 0.5, 0.3]])
    _, items = loss_fn(preds, targets)
    tcls, tbox, indices, anch = loss_fn.build_targets(preds, targets)
    lbox, lcls = 0.0, 0.0
    for i, p in enumerate(preds):
        b, a, gj, gi = indices[i]
        if not len(b):
            continue
        ps = p[b, a, gj, gi]
        pbox = torch.cat((ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * anch[i]), 1)
        lbox += (1 - bbox_ciou(pbox, tbox[i])).mean().item()
        onehot = F.one_hot(tcls[i], 3).float()
        lcls += F.binary_cross_entropy_with_logits(ps[:, 5:], onehot).item()
    assert items[0].item() == pytest.approx(lbox * HYP["box"], rel=1e-5)
    assert items[2].item() == pytest.approx(lcls * HYP["cls"], rel=1e-5)


def test_single_class_has_no_cls_loss_and_smoothing_changes_cls():
    targets = torch.tensor([[0, 0, 0.3, 0.55, 0.25, 0.25]])
    _, items = ComputeLoss(FakeModel(nc=1))(_preds(1, 1), targets)
    assert items[2] == 0 and items[0] > 0
    plain = ComputeLoss(FakeModel(nc=3))(_preds(1, 3), targets)[1]
    smooth = ComputeLoss(FakeModel(nc=3, hyp={**HYP, "label_smoothing": 0.2}))(_preds(1, 3), targets)[1]
    assert smooth[2] != plain[2] and smooth[0] == plain[0]


def test_focal_autobalance_ddp_and_hyp_errors():
    model = FakeModel(hyp={**HYP, "fl_gamma": 1.5})
    wrapper = nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like to us
    loss_fn = ComputeLoss(wrapper, autobalance=True)
    assert isinstance(loss_fn.BCEcls, FocalLoss) and loss_fn.ssi == 1
    total, items = loss_fn(_preds(2, 3), torch.tensor([[0, 1, 0.3, 0.55, 0.25, 0.25]]))
    assert torch.isfinite(total).all() and items[1] > 0
    assert loss_fn.balance[1] == 1.0 and loss_fn.balance != [4.0, 1.0, 0.4]
    bad = FakeModel()
    del bad.hyp["anchor_t"]
    with pytest.raises(ValueError, match="anchor_t"):
        ComputeLoss(bad)
    with pytest.raises(ValueError, match="detection head"):
        find_detect(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_float32_under_autocast():
    loss_fn = ComputeLoss(FakeModel())
    preds = [p.to(torch.bfloat16) for p in _preds(2, 3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, items = loss_fn(preds, torch.tensor([[0, 1, 0.3, 0.55, 0.25, 0.25]]))
    assert total.dtype == torch.float32 and items.dtype == torch.float32


def test_gradients_flow_to_predictions():
    loss_fn = ComputeLoss(FakeModel())
    preds = _preds(1, 3, requires_grad=True)
    total, _ = loss_fn(preds, torch.tensor([[0, 1, 0.3, 0.55, 0.25, 0.25]]))
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in preds)
    assert preds[0].grad[..., :4].abs().sum() > 0  # box channels receive signal at matched cells


# ---------------------------------------------------------------- real model
TINY_YAML = {
    "nc": 2,
    "depth_multiple": 0.33,
    "width_multiple": 0.125,
    "anchors": ANCHORS_PX,
    "backbone": [
        [-1, 1, "Conv", [64, 6, 2, 2]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 1, "C3", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 1, "C3", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "SPPF", [1024, 5]],
    ],
    "head": [[[4, 5, 7], 1, "Detect", ["nc", "anchors"]]],
}


def test_loss_decreases_on_tiny_detection_model():
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(TINY_YAML)
    model.hyp = dict(HYP)
    model.train()
    loss_fn = ComputeLoss(model)
    imgs = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 0, 0.30, 0.40, 0.30, 0.40], [1, 1, 0.70, 0.60, 0.40, 0.25]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(20):
        preds = model(imgs)
        assert [tuple(p.shape) for p in preds] == [(2, 3, 8, 8, 7), (2, 3, 4, 4, 7), (2, 3, 2, 2, 7)]
        total, items = loss_fn(preds, targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert all(math.isfinite(x) for x in history)
    assert history[-1] < 0.7 * history[0], history
