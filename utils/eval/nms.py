"""Non-maximum suppression: torchvision's kernel when it works, an equivalent pure-torch one otherwise.

`non_max_suppression` turns raw YOLOv5 outputs (batch, anchors, 5 + nc + nm) into per-image
detections exactly as YOLOv5 v7.0 does, except that it never stops early on a time limit.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from utils.boxes import xywh2xyxy

LOGGER = logging.getLogger(__name__)

MAX_WH = 7680  # class offset (pixels) that separates classes for class-aware NMS
MAX_NMS = 30000  # most candidates handed to NMS per image
_BLOCK = 256  # boxes per block in the pure-torch NMS (bounds the IoU matrices held at once)
_COLUMNS = 1024  # later boxes compared per step; keeps the (block, columns) temporaries cache-sized
_BACKENDS = ("torchvision", "torch")

__all__ = ["nms_indices", "nms_backend", "non_max_suppression", "MAX_WH", "MAX_NMS"]


@functools.lru_cache(maxsize=1)
def _torchvision_nms() -> Optional[Callable]:
    """torchvision.ops.nms if it imports and runs, else None. Probed once, on first use.

    A torchvision built for another torch raises RuntimeError at import ("operator torchvision::nms
    does not exist"), so a plain ImportError check is not enough; a one-box call proves the
    compiled operator is usable.
    """
    try:
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except (ImportError, RuntimeError, AttributeError) as e:
        LOGGER.debug("torchvision NMS unavailable, using pure-torch NMS: %s", e)
        return None
    return nms


def nms_backend() -> str:
    """'torchvision' when its NMS operator works here, else 'torch' (the pure-torch fallback)."""
    return "torchvision" if _torchvision_nms() is not None else "torch"


def _threshold_in(dtype: torch.dtype, iou_thres: float) -> float:
    """The largest ``dtype`` value t <= iou_thres, so that ``iou > t`` in ``dtype`` equals the
    double-precision test ``iou > iou_thres`` that torchvision's C++ performs, for every ``dtype`` iou.
    """
    np_type = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype)
    if np_type is None:
        return iou_thres
    t = np_type(iou_thres)
    if float(t) > iou_thres:
        t = np.nextafter(t, np_type(-np.inf))
    return float(t)


def _exceeds(x1, y1, x2, y2, areas, rows, cols: slice, thres: float) -> torch.Tensor:
    """Bool (len(rows), n_cols): IoU of boxes ``rows`` against boxes ``cols`` is above ``thres``.

    The arithmetic mirrors torchvision's kernel operation by operation (no eps, no +1 on sizes) so
    the two backends agree bit for bit.
    """
    w = torch.min(x2[rows, None], x2[None, cols]).sub_(torch.max(x1[rows, None], x1[None, cols])).clamp_(min=0)
    h = torch.min(y2[rows, None], y2[None, cols]).sub_(torch.max(y1[rows, None], y1[None, cols])).clamp_(min=0)
    inter = w.mul_(h)
    union = (areas[rows, None] + areas[None, cols]).sub_(inter)
    return inter.div_(union) > thres  # NaN (two empty boxes) compares False: never suppresses


def _nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
               max_keep: Optional[int] = None) -> torch.Tensor:
    """Greedy NMS in blocks: exact IoUs within a block, then kept boxes suppress all later blocks."""
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes[order].unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    thres = _threshold_in(areas.dtype, iou_thres)
    removed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    limit = n if max_keep is None else min(n, max_keep)
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        alive = (~removed[start:end]).cpu().numpy()
        if not alive.any():
            continue
        block = torch.arange(start, end, device=boxes.device)
        over = _exceeds(x1, y1, x2, y2, areas, block, slice(start, end), thres).cpu().numpy()
        kept_here = []
        while len(keep) + len(kept_here) < limit:
            i = int(alive.argmax())  # first survivor; everything before it is kept or suppressed
            if not alive[i]:
                break
            kept_here.append(i)
            alive[i] = False
            alive &= ~over[i]
        keep.extend(start + i for i in kept_here)
        if len(keep) >= limit:
            break
        rows = torch.as_tensor(np.asarray(kept_here, dtype=np.int64) + start, device=boxes.device)
        for c0 in range(end, n, _COLUMNS):
            c1 = min(c0 + _COLUMNS, n)
            removed[c0:c1] |= _exceeds(x1, y1, x2, y2, areas, rows, slice(c0, c1), thres).any(0)
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def nms_indices(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float,
                backend: Optional[str] = None, max_keep: Optional[int] = None) -> torch.Tensor:
    """Indices (long) of the boxes kept by greedy NMS, in decreasing score order.

    A box is dropped when its IoU with a higher-scoring kept box is strictly greater than
    ``iou_thres``; equal scores keep their input order. ``backend`` forces 'torchvision' or
    'torch' (default: torchvision when it works). ``max_keep`` lets the pure-torch path stop once
    that many boxes are kept (the result is then the first ``max_keep`` of the full answer).

    >>> nms_indices(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([.9, .8]), .5)
    tensor([0])
    """
    if backend not in (None, *_BACKENDS):
        raise ValueError(f"nms backend must be one of {_BACKENDS}, got {backend!r}")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"nms expects boxes (N, 4) and scores (N,), got {tuple(boxes.shape)} and "
                         f"{tuple(scores.shape)}")
    if backend == "torchvision" or (backend is None and _torchvision_nms() is not None):
        tv_nms = _torchvision_nms()
        if tv_nms is None:
            raise RuntimeError("nms backend 'torchvision' requested but torchvision NMS is unavailable")
        keep = tv_nms(boxes, scores, iou_thres)
        return keep if max_keep is None else keep[:max_keep]
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    return _nms_torch(boxes, scores, iou_thres, max_keep)


def _check_thresholds(conf_thres: float, iou_thres: float) -> None:
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} is invalid: it must lie in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres} is invalid: it must lie in [0, 1]")


def _label_rows(lb: torch.Tensor, nc: int, nm: int, like: torch.Tensor) -> torch.Tensor:
    """Apriori labels (n, 5) [cls, xywh] as certain prediction rows (n, 5+nc+nm) (autolabelling)."""
    v = torch.zeros((len(lb), 5 + nc + nm), device=like.device, dtype=like.dtype)
    v[:, :4] = lb[:, 1:5]
    v[:, 4] = 1.0
    v[torch.arange(len(lb)), lb[:, 0].long() + 5] = 1.0
    return v


def _gather_rows(prediction: torch.Tensor, conf_thres: float, labels, nc: int,
                 nm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with obj > conf_thres of every image (k, 5+nc+nm) and their image indices (k,).

    Done for the whole batch at once (one host read instead of one per image). Rows stay grouped
    by image in anchor order, each image's apriori ``labels`` after its own rows, as a per-image
    loop would build them.
    """
    image, anchor = (prediction[..., 4] > conf_thres).nonzero(as_tuple=True)
    rows = prediction[image, anchor]
    extra = [(i, lb) for i, lb in enumerate(labels or ()) if len(lb)]
    if extra:
        rows = torch.cat((rows, *(_label_rows(lb, nc, nm, rows) for _, lb in extra)), 0)
        image = torch.cat((image, *(torch.full((len(lb),), i, device=image.device) for i, lb in extra)), 0)
        order = torch.sort(image, stable=True).indices
        rows, image = rows[order], image[order]
    return rows, image


def _candidates(x: torch.Tensor, image: torch.Tensor, nc: int, conf_thres: float, multi_label: bool,
                classes: Optional[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, 5+nc+nm) -> candidate detections (k, 6+nm) [xyxy, conf, cls, masks] and their images (k,).

    Row-wise only, so running it on the whole batch gives each image exactly the candidates, in
    the same order, that running it per image would.
    """
    mi = 5 + nc  # first mask column
    x[:, 5:] *= x[:, 4:5]  # conf = obj * cls (mask columns are scaled too, as upstream; unused after)
    box = xywh2xyxy(x[:, :4])
    mask = x[:, mi:]
    if multi_label:
        i, j = (x[:, 5:mi] > conf_thres).nonzero(as_tuple=False).T
        x, image = torch.cat((box[i], x[i, 5 + j, None], j[:, None].float(), mask[i]), 1), image[i]
    else:
        conf, j = x[:, 5:mi].max(1, keepdim=True)
        keep = conf.view(-1) > conf_thres
        x, image = torch.cat((box, conf, j.float(), mask), 1)[keep], image[keep]
    if classes is not None:
        keep = (x[:, 5:6] == torch.tensor(classes, device=x.device)).any(1)
        x, image = x[keep], image[keep]
    return x, image


def non_max_suppression(prediction, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: Optional[Sequence[int]] = None, agnostic: bool = False,
                        multi_label: bool = False, labels=(), max_det: int = 300,
                        nm: int = 0) -> list[torch.Tensor]:
    """YOLOv5 v7.0 NMS over a batch; returns one (n, 6 + nm) tensor [x1, y1, x2, y2, conf, cls] per image.

    ``prediction`` is (batch, anchors, 5 + nc + nm) with xywh boxes, objectness and class scores
    (a (pred, train_out) tuple is accepted). A box is a candidate when obj > conf_thres; its score
    is obj * cls. With ``multi_label`` (only when nc > 1) every class above conf_thres makes its own
    detection, else the best class is used. Classes are kept apart by offsetting boxes by
    cls * 7680 unless ``agnostic``. ``labels`` (per image (n, 5) [cls, xywh] pixel tensors) are
    added as certain detections. Unlike upstream there is no time limit: nothing is dropped for
    being slow.
    """
    _check_thresholds(conf_thres, iou_thres)
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]  # inference output of (inference, train) pair
    device = prediction.device
    if device.type == "mps":  # NMS is not fully supported there
        prediction = prediction.cpu()
    bs = prediction.shape[0]
    nc = prediction.shape[2] - nm - 5
    rows, image = _gather_rows(prediction, conf_thres, labels, nc, nm)
    dets, image = _candidates(rows, image, nc, conf_thres, multi_label and nc > 1, classes)
    output = [torch.zeros((0, 6 + nm), device=device)] * bs
    counts = torch.bincount(image, minlength=bs).tolist()  # one host read for the whole batch
    for xi, x in enumerate(dets.split(counts)):  # NMS itself stays per image: batched it costs n^2 memory
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:MAX_NMS]]
        offset = x[:, 5:6] * (0 if agnostic else MAX_WH)
        i = nms_indices(x[:, :4] + offset, x[:, 4], iou_thres, max_keep=max_det)[:max_det]
        output[xi] = x[i].to(device)
    return output
