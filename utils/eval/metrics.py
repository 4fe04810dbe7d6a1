"""Detection metrics as YOLOv5 v7.0 computes them: matching, AP, P/R at best F1, confusion matrix.

Every step (sort orders, sentinels, interpolation grids, rounding) follows upstream so that the
printed P, R, mAP50 and mAP50-95 are identical for identical predictions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from utils.boxes import box_iou

LOGGER = logging.getLogger(__name__)

FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)  # P, R, mAP50, mAP50-95
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2.0 only has the old name

__all__ = ["fitness", "smooth", "compute_ap", "PRCurves", "pr_curves", "at_best_f1", "ap_per_class", "match_predictions", "match_predictions_torch",
           "ConfusionMatrix"]


def fitness(results) -> Union[float, np.ndarray]:
    """0.1 mAP50 + 0.9 mAP50-95 of [P, R, mAP50, mAP50-95, ...]: a float for one result, an array per row
    for a 2-D array of them. The one definition training (best.pt, early stopping) uses.
    """
    x = np.asarray(results, dtype=np.float64)
    if x.ndim == 1:
        return FITNESS_WEIGHTS[2] * float(x[2]) + FITNESS_WEIGHTS[3] * float(x[3])
    return (x[:, :4] * list(FITNESS_WEIGHTS)).sum(1)


def smooth(y: np.ndarray, f: float = 0.05) -> np.ndarray:
    """Box-filter ``y`` over a window of about ``f`` of its length (odd, edges padded with end values)."""
    nf = round(len(y) * f * 2) // 2 + 1
    pad = np.ones(nf // 2)
    yp = np.concatenate((pad * y[0], y, pad * y[-1]), 0)
    return np.convolve(yp, np.ones(nf) / nf, mode="valid")


def compute_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AP of one precision/recall curve by COCO's 101-point interpolation.

    Returns (ap, mpre, mrec): the curve with sentinels (recall 0 and 1, precision 1 and 0) and the
    precision made monotonically non-increasing (its envelope).
    """
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    ap = _trapezoid(np.interp(x, mrec, mpre), x)
    return ap, mpre, mrec


@dataclass
class PRCurves:
    """Per-class curves behind AP: what the evaluation plots (see utils.eval.plots.plot_pr_curves).

    ``px`` is the 1000-point grid (confidence for p/r/f1, recall for ``py``); ``p``, ``r``, ``f1`` are
    (k, 1000) over confidence; ``py`` one precision-at-recall array per class with labels (AP50
    curve); ``ap`` (k, t); ``classes`` the k classes that have labels.
    """

    px: np.ndarray
    py: list
    p: np.ndarray
    r: np.ndarray
    f1: np.ndarray
    ap: np.ndarray
    classes: np.ndarray


def pr_curves(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
              eps: float = 1e-16) -> tuple[PRCurves, np.ndarray]:
    """Per-class precision/recall/F1 over confidence and AP at each IoU threshold; returns
    (curves, label count per class). Inputs as :func:`ap_per_class`.
    """
    i = np.argsort(-conf)
    tp, conf, pred_cls = tp[i], conf[i], pred_cls[i]
    unique_classes, nt = np.unique(target_cls, return_counts=True)
    nc = unique_classes.shape[0]

    px, py = np.linspace(0, 1, 1000), []  # confidence grid; precision at recall px, for plots
    ap, p, r = np.zeros((nc, tp.shape[1])), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    for ci, c in enumerate(unique_classes):
        i = pred_cls == c
        n_l, n_p = nt[ci], i.sum()
        if n_p == 0 or n_l == 0:
            continue
        fpc = (1 - tp[i]).cumsum(0)
        tpc = tp[i].cumsum(0)
        recall = tpc / (n_l + eps)
        precision = tpc / (tpc + fpc)
        # confidence decreases along the curves, so interpolate against -conf (np.interp wants increasing x)
        r[ci] = np.interp(-px, -conf[i], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[i], precision[:, 0], left=1)
        for j in range(tp.shape[1]):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0:
                py.append(np.interp(px, mrec, mpre))

    f1 = 2 * p * r / (p + r + eps)
    return PRCurves(px, py, p, r, f1, ap, unique_classes.astype(int)), nt


def at_best_f1(curves: PRCurves, nt: np.ndarray, eps: float = 1e-16):
    """(tp, fp, p, r, f1, ap, classes) at the confidence of best smoothed mean F1 (upstream's choice)."""
    i = smooth(curves.f1.mean(0), 0.1).argmax()
    p, r, f1 = curves.p[:, i], curves.r[:, i], curves.f1[:, i]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, curves.ap, curves.classes


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                 eps: float = 1e-16):
    """Per-class AP at each IoU threshold and P, R, F1 at the confidence of best mean F1.

    ``tp`` (n, t) says which of n predictions are correct at each of t IoU thresholds; ``conf`` and
    ``pred_cls`` (n,) describe them; ``target_cls`` (m,) holds every label's class. Returns
    (tp, fp, p, r, f1, ap, unique_classes): counts, precision, recall and F1 (k,) for the k
    classes that have labels, ap (k, t), and those classes as ints. The curves behind them:
    :func:`pr_curves`.
    """
    curves, nt = pr_curves(tp, conf, pred_cls, target_cls, eps)
    return at_best_f1(curves, nt, eps)


def _unique_matches(iou: torch.Tensor, hit: torch.Tensor) -> np.ndarray:
    """One-to-one (label, detection, iou) rows among the pairs in ``hit``, best IoU first (confusion matrix).

    Mirrors upstream's confusion matrix: sort by IoU descending, keep each detection's first row,
    sort again, keep each label's first row. The sort is stable (equal IoUs: the later pair in
    (label, detection) order first) so ties do not depend on numpy's SIMD sort of the machine.
    """
    x = torch.where(hit)
    if not x[0].shape[0]:
        return np.zeros((0, 3))
    matches = torch.cat((torch.stack(x, 1), iou[x[0], x[1]][:, None]), 1).cpu().numpy()
    if x[0].shape[0] > 1:
        matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
        matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
        matches = matches[matches[:, 2].argsort(kind="stable")[::-1]]
        matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
    return matches


def match_predictions_torch(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> torch.Tensor:
    """Correctness (N, T) bool of detections (N, 6) [xyxy, conf, cls] against labels (M, 5) [cls, xyxy].

    For each IoU threshold in ``iouv`` a detection is correct when it is matched one-to-one with a
    label of the same class at IoU >= threshold, as val.py's process_batch matches them greedily:
    pairs sorted by IoU descending, each detection keeps its best label, then each label keeps the
    lowest-index detection that chose it. Equal IoUs resolve as a stable sort reversed would: the
    detection keeps the highest-index label. Runs on the inputs' device without host reads.

    >>> lab = torch.tensor([[0., 0, 0, 10, 10]])
    >>> match_predictions_torch(torch.tensor([[0., 0, 10, 10, .9, 0]]), lab, torch.tensor([.5, .95]))
    tensor([[True, True]])
    """
    n, device = detections.shape[0], detections.device
    if not n or not labels.shape[0]:
        return torch.zeros((n, iouv.shape[0]), dtype=torch.bool, device=device)
    iou = box_iou(labels[:, 1:], detections[:, :4])  # (M, N)
    usable = (labels[:, 0:1] == detections[:, 5]) & ~iou.isnan()
    score = iou.masked_fill(~usable, float("-inf"))
    best = score.amax(0)  # a detection's hits at any threshold always include its best label
    rows = torch.arange(iou.shape[0], device=device)[:, None]
    label = torch.where(score == best, rows, -1).amax(0)  # (N,) highest-index label among equal IoUs
    # iouv cast to the IoU dtype: the comparison upstream makes with a 0-dim threshold tensor
    hit = best[:, None] >= iouv.to(best.dtype)[None]  # (N, T)
    index = torch.arange(n, device=device)[:, None]
    competing = torch.where(hit, index, n)  # a detection's own index where it has a hit, else n
    label_t = label[:, None].expand_as(hit)
    first = torch.full((iou.shape[0], hit.shape[1]), n, dtype=torch.long, device=device)
    first.scatter_reduce_(0, label_t, competing, reduce="amin")  # lowest detection per (label, threshold)
    return hit & (first.gather(0, label_t) == index)


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> np.ndarray:
    """Host (numpy) copy of :func:`match_predictions_torch`: correctness (N, T) of N detections."""
    return match_predictions_torch(detections, labels, iouv).cpu().numpy()


class ConfusionMatrix:
    """Counts of (predicted class, true class) with a background row/column at index ``nc``.

    ``matrix[p, t]``: column t is the true class (``nc`` = background, i.e. a false positive), row
    p the predicted one (``nc`` = missed).
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.matrix = np.zeros((nc + 1, nc + 1))
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres

    def process_batch(self, detections, labels: torch.Tensor) -> None:
        """Add one image: detections (N, 6) [xyxy, conf, cls] (or None) and labels (M, 5) [cls, xyxy].

        With ``detections`` None, ``labels`` is the (M,) class vector of labels all missed.
        Detections at or below ``conf`` are ignored; a label and a detection match when their IoU
        exceeds ``iou_thres`` (one-to-one, best IoU first).
        """
        if detections is None:
            for gc in labels.int().tolist():
                self.matrix[self.nc, gc] += 1
            return
        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().tolist()
        det_classes = detections[:, 5].int().tolist()
        iou = box_iou(labels[:, 1:], detections[:, :4])
        matches = _unique_matches(iou, iou > self.iou_thres)
        m0, m1 = matches[:, 0].astype(int), matches[:, 1].astype(int)
        for i, gc in enumerate(gt_classes):
            j = m0 == i
            if j.sum() == 1:
                self.matrix[det_classes[m1[j][0]], gc] += 1
            else:
                self.matrix[self.nc, gc] += 1  # label missed
        # Unlike v7.0 (which skips this when nothing matched), unmatched detections always count
        # as background false positives.
        for i, dc in enumerate(det_classes):
            if not (m1 == i).any():
                self.matrix[dc, self.nc] += 1

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives per class (background excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def print(self) -> None:
        """Log the matrix, one row per line."""
        for row in self.matrix:
            LOGGER.info(" ".join(map(str, row)))
