"""YOLOv5 v7.0 training loss: CIoU box loss, BCE objectness and BCE classification.

The numbers match upstream v7.0 for the same predictions and targets; the code is organised as
three steps (match targets to anchors and cells, score the matched predictions, weight and sum).

Example:
    >>> loss_fn = ComputeLoss(model)            # model.hyp holds box/obj/cls/... gains
    >>> loss, items = loss_fn(model(imgs), targets)  # targets: (nt, 6) [img, cls, x, y, w, h]
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Objectness weight per output level, small strides first (v7.0 values).
_BALANCE_3 = [4.0, 1.0, 0.4]
_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]

# A target may be assigned to its own cell and to the two nearest neighbour cells; these are the
# offsets (in cells, before scaling by _CELL_BIAS) for: own, left, up, right, down.
_NEIGHBOURS = ((0, 0), (1, 0), (0, 1), (-1, 0), (0, -1))
_CELL_BIAS = 0.5

_DETECT_ATTRS = ("na", "nc", "nl", "anchors", "stride")
_HYP_KEYS = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma")


def smooth_BCE(eps: float = 0.1) -> tuple[float, float]:  # noqa: N802 (upstream name)
    """Return (positive, negative) BCE targets for label smoothing ``eps``: (1 - eps/2, eps/2)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class FocalLoss(nn.Module):
    """Focal loss wrapped around an elementwise BCE-with-logits criterion (Lin et al., 2017).

    ``loss_fcn`` keeps its pos_weight; its reduction is moved here and applied after focusing.
    """

    def __init__(self, loss_fcn: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25) -> None:
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # focusing needs the per-element loss

    def forward(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """Focal-weighted loss of logits ``pred`` against targets ``true`` in [0, 1]."""
        loss = self.loss_fcn(pred, true)
        prob = torch.sigmoid(pred)
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_factor = true * self.alpha + (1 - true) * (1 - self.alpha)
        loss = loss * alpha_factor * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, xywh: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al., 2020) of paired boxes ``box1[i]`` and ``box2[i]``.

    Boxes are (..., 4) as centre xywh (default) or corner xyxy. Returns (...,) values in (-1.5, 1]:
    1 for identical boxes, below 0 for boxes that do not overlap and lie far apart.
    """
    if xywh:
        x1, y1, w1, h1 = box1.unbind(-1)
        x2, y2, w2, h2 = box2.unbind(-1)
        a_x1, a_x2, a_y1, a_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
        b_x1, b_x2, b_y1, b_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    else:
        a_x1, a_y1, a_x2, a_y2 = box1.unbind(-1)
        b_x1, b_y1, b_x2, b_y2 = box2.unbind(-1)
        # eps keeps the aspect-ratio term finite for degenerate (zero-height) boxes
        w1, h1 = a_x2 - a_x1, a_y2 - a_y1 + eps
        w2, h2 = b_x2 - b_x1, b_y2 - b_y1 + eps

    inter_w = (torch.minimum(a_x2, b_x2) - torch.maximum(a_x1, b_x1)).clamp(0)
    inter_h = (torch.minimum(a_y2, b_y2) - torch.maximum(a_y1, b_y1)).clamp(0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    # penalty 1: centre distance relative to the diagonal of the smallest enclosing box
    enclose_w = torch.maximum(a_x2, b_x2) - torch.minimum(a_x1, b_x1)
    enclose_h = torch.maximum(a_y2, b_y2) - torch.minimum(a_y1, b_y1)
    diag2 = enclose_w**2 + enclose_h**2 + eps
    centre2 = ((b_x1 + b_x2 - a_x1 - a_x2) ** 2 + (b_y1 + b_y2 - a_y1 - a_y2) ** 2) / 4
    # penalty 2: aspect-ratio consistency, weighted by alpha which the paper treats as a constant
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre2 / diag2 + v * alpha)


def find_detect(model: nn.Module) -> nn.Module:
    """Return the detection head of ``model`` (unwrapping DDP), found as ``model.model[-1]`` or by attributes.

    The head is recognised by its attributes (na, nc, nl, anchors, stride) so that a quantized or
    traced copy whose head class differs still works.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    layers = getattr(model, "model", None)
    if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers):
        last = layers[-1]
        if all(hasattr(last, a) for a in _DETECT_ATTRS):
            return last
    heads = [m for m in model.modules() if all(hasattr(m, a) for a in _DETECT_ATTRS)]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no detection head with attributes {_DETECT_ATTRS} found")
    return heads[-1]


class ComputeLoss:
    """YOLOv5 v7.0 loss for a detection model.

    Args:
        model: a DetectionModel (or DDP wrapper, or a quantized copy) whose head has na, nc, nl,
            anchors (nl, na, 2) in grid units and stride.
        autobalance: adapt the per-level objectness weights during training (upstream option).
        hyp: hyperparameters; defaults to ``model.hyp``. Keys: box, obj, cls, cls_pw, obj_pw,
            anchor_t, fl_gamma and optionally label_smoothing.

    Calling it with ``preds`` (list of (bs, na, ny, nx, 5 + nc) raw maps) and ``targets``
    ((nt, 6) [img_idx, cls, x, y, w, h], normalised) returns ``(loss * bs, [lbox, lobj, lcls])``.
    """

    sort_obj_iou = False
    gr = 1.0  # objectness target = gr * iou + (1 - gr)

    def __init__(
        self, model: nn.Module, autobalance: bool = False, hyp: dict[str, Any] | None = None
    ) -> None:
        base = getattr(model, "module", model)
        hyp = hyp if hyp is not None else getattr(base, "hyp", None)
        if hyp is None:
            raise ValueError(f"{type(base).__name__}: no 'hyp' dict on the model and none given")
        missing = [k for k in _HYP_KEYS if k not in hyp]
        if missing:
            raise ValueError(f"ComputeLoss: hyperparameters missing keys {missing}")
        self.hyp = hyp
        head = find_detect(model)
        self.na, self.nc, self.nl = int(head.na), int(head.nc), int(head.nl)
        self.anchors = head.anchors.detach().float().clone()
        strides = [int(s) for s in head.stride]
        self.balance = list(_BALANCE_3 if self.nl == 3 else _BALANCE_DEFAULT)
        self.ssi = strides.index(16) if autobalance else 0
        self.autobalance = autobalance
        self.cp, self.cn = smooth_BCE(eps=hyp.get("label_smoothing", 0.0))

        self.BCEcls: nn.Module = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp["cls_pw"])]))
        self.BCEobj: nn.Module = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(hyp["obj_pw"])]))
        if hyp["fl_gamma"] > 0:
            self.BCEcls = FocalLoss(self.BCEcls, hyp["fl_gamma"])
            self.BCEobj = FocalLoss(self.BCEobj, hyp["fl_gamma"])
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        self._to(self.device)

    def _to(self, device: torch.device) -> None:
        # follow the predictions if the model moved after the loss was built
        self.device = device
        self.anchors = self.anchors.to(device)
        self.BCEcls.to(device)
        self.BCEobj.to(device)

    def __call__(
        self, preds: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (total loss scaled by batch size, detached (lbox, lobj, lcls))."""
        if len(preds) != self.nl:
            raise ValueError(f"ComputeLoss: expected {self.nl} prediction maps, got {len(preds)}")
        device = preds[0].device
        if device != self.device:
            self._to(device)
        # losses are computed in float32 even when the forward pass ran under autocast
        with torch.autocast(device_type=device.type, enabled=False):
            preds = [p.float() for p in preds]
            return self._loss(preds, targets.to(device=device, dtype=torch.float32))

    def _loss(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device
        lbox = torch.zeros(1, device=device)
        lobj = torch.zeros(1, device=device)
        lcls = torch.zeros(1, device=device)
        tcls, tbox, indices, anchors = self.build_targets(preds, targets)

        for i, pi in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=device)
            n = b.shape[0]
            if n:
                pxy, pwh, _, pcls = pi[b, a, gj, gi].split((2, 2, 1, self.nc), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox[i])
                lbox = lbox + (1.0 - iou).mean()

                iou = iou.detach().clamp(0)
                if self.sort_obj_iou:
                    order = iou.argsort()
                    b, a, gj, gi, iou = b[order], a[order], gj[order], gi[order], iou[order]
                if self.gr < 1:
                    iou = (1.0 - self.gr) + self.gr * iou
                tobj[b, a, gj, gi] = iou

                if self.nc > 1:  # a single class is scored by objectness alone
                    t = torch.full_like(pcls, self.cn)
                    t[torch.arange(n, device=device), tcls[i]] = self.cp
                    lcls = lcls + self.BCEcls(pcls, t)

            obji = self.BCEobj(pi[..., 4], tobj)
            lobj = lobj + obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()

        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox = lbox * self.hyp["box"]
        lobj = lobj * self.hyp["obj"]
        lcls = lcls * self.hyp["cls"]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(
        self, preds: Sequence[torch.Tensor], targets: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
        """Assign targets to (anchor, cell) pairs on every level.

        A target matches an anchor when both width and height ratios lie within ``anchor_t``; it is
        then placed in its own cell and in the two neighbour cells nearest to its centre.

        Returns per level: class ids (n,), boxes (n, 4) as xy offset from the cell corner and wh in
        grid units, indices (image, anchor, gy, gx), and the matched anchors (n, 2).
        """
        device = targets.device
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=device)
        # every target once per anchor, with the anchor index appended: (na, nt, 7)
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)
        off = torch.tensor(_NEIGHBOURS, device=device, dtype=torch.float32) * _CELL_BIAS
        g = _CELL_BIAS

        for i in range(self.nl):
            anchors, shape = self.anchors[i], preds[i].shape
            gain[2:6] = torch.tensor(shape, device=device, dtype=torch.float32)[[3, 2, 3, 2]]
            t = targets * gain  # to grid units
            if nt:
                r = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(r, 1 / r).max(2)[0] < self.hyp["anchor_t"]]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy  # distance from the far edges
                left, up = ((gxy % 1 < g) & (gxy > 1)).T
                right, down = ((gxi % 1 < g) & (gxi > 1)).T
                keep = torch.stack((torch.ones_like(left), left, up, right, down))
                t = t.repeat((5, 1, 1))[keep]
                offsets = (torch.zeros_like(gxy)[None] + off[:, None])[keep]
            else:
                t = targets[0]
                offsets = torch.zeros_like(t[:, 2:4])

            bc, gxy, gwh, a = t.split((2, 2, 2, 1), 1)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - offsets).long()
            # a centre exactly on the far edge lands one cell outside the grid
            gij[:, 0].clamp_(0, shape[3] - 1)
            gij[:, 1].clamp_(0, shape[2] - 1)
            gi, gj = gij.T
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - gij, gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch
