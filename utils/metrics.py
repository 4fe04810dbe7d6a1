"""Detection metrics as YOLOv5 v7.0 computes them: matching, AP, P/R at best F1, confusion matrix.

Every step (sort orders, sentinels, interpolation grids, rounding) follows upstream so that the
printed P, R, mAP50 and mAP50-95 are identical for identical predictions.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from utils.boxes import box_iou

LOGGER = logging.getLogger(__name__)

FITNESS_WEIGHTS = (0.0, 0.0, 0.1, 0.9)  # P, R, mAP50, mAP50-95
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2.0 only has the old name

__all__ = ["fitness", "smooth", "compute_ap", "ap_per_class", "match_predictions", "ConfusionMatrix"]


def fitness(x: np.ndarray) -> np.ndarray:
    """Model fitness per row of ``x`` (n, >=4) [P, R, mAP50, mAP50-95, ...]: 0.1 mAP50 + 0.9 mAP50-95."""
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


def _class_names(names: Union[Mapping, Sequence], unique_classes: np.ndarray) -> dict:
    """Names of the classes present in the labels, re-indexed 0..k-1 in class order (for legends)."""
    items = names.items() if isinstance(names, Mapping) else enumerate(names)
    return dict(enumerate(v for k, v in items if k in unique_classes))


def _plot_curves(px, py, f1, p, r, ap, save_dir, names, prefix) -> None:
    from utils.plots import plot_mc_curve, plot_pr_curve

    save_dir = Path(save_dir)
    plot_pr_curve(px, py, ap, save_dir / f"{prefix}PR_curve.png", names)
    plot_mc_curve(px, f1, save_dir / f"{prefix}F1_curve.png", names, ylabel="F1")
    plot_mc_curve(px, p, save_dir / f"{prefix}P_curve.png", names, ylabel="Precision")
    plot_mc_curve(px, r, save_dir / f"{prefix}R_curve.png", names, ylabel="Recall")


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray,
                 plot: bool = False, save_dir: Union[str, Path] = Path(), names=(), eps: float = 1e-16,
                 prefix: str = ""):
    """Per-class AP at each IoU threshold and P, R, F1 at the confidence of best mean F1.

    ``tp`` (n, t) says which of n predictions are correct at each of t IoU thresholds; ``conf`` and
    ``pred_cls`` (n,) describe them; ``target_cls`` (m,) holds every label's class. Returns
    (tp, fp, p, r, f1, ap, unique_classes): counts, precision, recall and F1 (k,) for the k
    classes that have labels, ap (k, t), and those classes as ints.
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
            if plot and j == 0:
                py.append(np.interp(px, mrec, mpre))

    f1 = 2 * p * r / (p + r + eps)
    if plot:
        _plot_curves(px, py, f1, p, r, ap, save_dir, _class_names(names, unique_classes), prefix)

    i = smooth(f1.mean(0), 0.1).argmax()
    p, r, f1 = p[:, i], r[:, i], f1[:, i]
    tp = (r * nt).round()
    fp = (tp / (p + eps) - tp).round()
    return tp, fp, p, r, f1, ap, unique_classes.astype(int)


def _unique_matches(iou: torch.Tensor, hit: torch.Tensor, sort_twice: bool) -> np.ndarray:
    """One-to-one (label, detection, iou) rows among the pairs in ``hit``, best IoU first.

    Mirrors upstream: sort by IoU descending, keep each detection's first row, then each label's
    first row (numpy's default sort and np.unique's first occurrence, so ties resolve identically).
    The confusion matrix re-sorts between the two steps; validation matching does not.
    """
    x = torch.where(hit)
    if not x[0].shape[0]:
        return np.zeros((0, 3))
    matches = torch.cat((torch.stack(x, 1), iou[x[0], x[1]][:, None]), 1).cpu().numpy()
    if x[0].shape[0] > 1:
        matches = matches[matches[:, 2].argsort()[::-1]]
        matches = matches[np.unique(matches[:, 1], return_index=True)[1]]
        if sort_twice:
            matches = matches[matches[:, 2].argsort()[::-1]]
        matches = matches[np.unique(matches[:, 0], return_index=True)[1]]
    return matches


def match_predictions(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> np.ndarray:
    """Correctness (N, T) of detections (N, 6) [xyxy, conf, cls] against labels (M, 5) [cls, xyxy].

    For each IoU threshold in ``iouv`` a detection is correct when it is matched one-to-one (greedy
    by IoU) with a label of the same class at IoU >= threshold. This is val.py's process_batch.
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if not detections.shape[0] or not labels.shape[0]:
        return correct
    iou = box_iou(labels[:, 1:], detections[:, :4])
    same_class = labels[:, 0:1] == detections[:, 5]
    for t in range(len(iouv)):
        matches = _unique_matches(iou, (iou >= iouv[t]) & same_class, sort_twice=False)
        correct[matches[:, 1].astype(int), t] = True
    return correct


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
        matches = _unique_matches(iou, iou > self.iou_thres, sort_twice=True)
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

    def plot(self, normalize: bool = True, save_dir: Union[str, Path] = "", names=()) -> Path:
        """Save confusion_matrix.png in ``save_dir`` (columns normalised to sum 1 when ``normalize``)."""
        from utils.plots import plot_confusion_matrix

        return plot_confusion_matrix(self.matrix, normalize=normalize, save_dir=save_dir, names=names)

    def print(self) -> None:
        """Log the matrix, one row per line."""
        for row in self.matrix:
            LOGGER.info(" ".join(map(str, row)))
