"""Box format conversions, clipping, rescaling and overlap measures.

Formats: ``xyxy`` is (x1, y1, x2, y2) corners, ``xywh`` is (centre x, centre y, width, height); an
``n`` suffix means normalised to the image size. Conversions accept torch tensors or numpy arrays of
shape (..., 4) and return a new object of the same kind. The element-wise operations are performed
in the same order as YOLOv5 v7.0 so that float results are bit-identical to upstream's.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

Array = Union[torch.Tensor, np.ndarray]

__all__ = [
    "xywh2xyxy", "xyxy2xywh", "xywhn2xyxy", "xyxy2xywhn", "xyn2xy", "clip_boxes", "scale_boxes",
    "box_iou", "bbox_iou", "bbox_ioa",
]


def _copy(x: Array) -> Array:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: Array) -> Array:
    """Centre/size boxes to corner boxes, e.g. [[5, 5, 2, 4]] -> [[4, 3, 6, 7]]."""
    y = _copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: Array) -> Array:
    """Corner boxes to centre/size boxes, e.g. [[4, 3, 6, 7]] -> [[5, 5, 2, 4]]."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: Array, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Array:
    """Normalised centre/size boxes to pixel corners in a (w, h) image shifted by (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: Array, w: float = 640, h: float = 640, clip: bool = False, eps: float = 0.0) -> Array:
    """Pixel corners to normalised centre/size boxes.

    With ``clip`` the input itself is clipped to (h - eps, w - eps) first, in place, as upstream does
    (the dataset relies on its labels being clipped afterwards too).
    """
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def xyn2xy(x: Array, w: float = 640, h: float = 640, padw: float = 0, padh: float = 0) -> Array:
    """Normalised points (n, 2), e.g. polygon segments, to pixels shifted by (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * x[..., 0] + padw
    y[..., 1] = h * x[..., 1] + padh
    return y


def clip_boxes(boxes: Array, shape: Sequence[float]) -> Array:
    """Clip xyxy ``boxes`` in place to an image of ``shape`` (height, width); returns ``boxes``."""
    if isinstance(boxes, torch.Tensor):
        # column by column: each clamp_ writes through the view into ``boxes``
        boxes[..., 0].clamp_(0, shape[1])
        boxes[..., 1].clamp_(0, shape[0])
        boxes[..., 2].clamp_(0, shape[1])
        boxes[..., 3].clamp_(0, shape[0])
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, shape[1])
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, shape[0])
    return boxes


def scale_boxes(img1_shape: Sequence[int], boxes: Array, img0_shape: Sequence[int], ratio_pad=None) -> Array:
    """Map xyxy ``boxes`` from a letterboxed image of ``img1_shape`` (h, w) back to ``img0_shape``.

    Works in place (callers pass a clone when they need the original) and returns ``boxes``.
    ``ratio_pad`` is the dataset's ((ratio_h, ratio_w), (pad_w, pad_h)); without it the letterbox
    gain and centred padding are recomputed from the two shapes.
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad = (img1_shape[1] - img0_shape[1] * gain) / 2, (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad = ratio_pad[1]
    boxes[..., 0:4:2] -= pad[0]  # x1, x2 (slices, not index lists: no index tensor copied to the GPU)
    boxes[..., 1:4:2] -= pad[1]  # y1, y2
    boxes[..., :4] /= gain
    clip_boxes(boxes, img0_shape)
    return boxes


def box_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    lo1, hi1 = box1[:, None, :2], box1[:, None, 2:4]
    lo2, hi2 = box2[None, :, :2], box2[None, :, 2:4]
    inter = (torch.min(hi1, hi2) - torch.max(lo1, lo2)).clamp(0).prod(2)
    area1 = (hi1 - lo1).prod(2)
    area2 = (hi2 - lo2).prod(2)
    return inter / (area1 + area2 - inter + eps)


def _corners(box: torch.Tensor, xywh: bool, eps: float):
    """Split boxes into x1, y1, x2, y2, w, h (each (..., 1)) the way the v7.0 loss does."""
    if xywh:
        xc, yc, w, h = box.chunk(4, -1)
        hw, hh = w / 2, h / 2
        return xc - hw, yc - hh, xc + hw, yc + hh, w, h
    x1, y1, x2, y2 = box.chunk(4, -1)
    return x1, y1, x2, y2, x2 - x1, y2 - y1 + eps


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, xywh: bool = True, GIoU: bool = False,
             DIoU: bool = False, CIoU: bool = False, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise (broadcast) IoU of ``box1`` (..., 4) and ``box2`` (..., 4), shape (..., 1).

    GIoU, DIoU and CIoU follow the papers' definitions as YOLOv5 v7.0 computes them (CIoU's
    trade-off weight ``alpha`` is treated as a constant for the gradient).
    """
    a_x1, a_y1, a_x2, a_y2, w1, h1 = _corners(box1, xywh, eps)
    b_x1, b_y1, b_x2, b_y2, w2, h2 = _corners(box2, xywh, eps)
    inter = (torch.min(a_x2, b_x2) - torch.max(a_x1, b_x1)).clamp(0) * \
        (torch.min(a_y2, b_y2) - torch.max(a_y1, b_y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou
    cw = torch.max(a_x2, b_x2) - torch.min(a_x1, b_x1)  # enclosing box
    ch = torch.max(a_y2, b_y2) - torch.min(a_y1, b_y1)
    if DIoU or CIoU:
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((b_x1 + b_x2 - a_x1 - a_x2) ** 2 + (b_y1 + b_y2 - a_y1 - a_y2) ** 2) / 4
        if not CIoU:
            return iou - rho2 / c2
        v = (4 / math.pi ** 2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (rho2 / c2 + v * alpha)
    c_area = cw * ch + eps
    return iou - (c_area - union) / c_area


def bbox_ioa(box1: np.ndarray, box2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Intersection of one xyxy box (4,) with each of ``box2`` (n, 4), over the area of each box2."""
    iw = (np.minimum(box1[2], box2[:, 2]) - np.maximum(box1[0], box2[:, 0])).clip(0)
    ih = (np.minimum(box1[3], box2[:, 3]) - np.maximum(box1[1], box2[:, 1])).clip(0)
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1]) + eps
    return iw * ih / area2
