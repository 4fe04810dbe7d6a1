"""One-to-one matching of two models' detections on the same image (detect.py --compare).

Example:
    >>> a = torch.tensor([[0, 0, 10, 10, 0.9, 1.0]])
    >>> match_detections(a, a.clone()).matched
    1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.boxes import box_iou

__all__ = ["MatchResult", "match_detections"]


@dataclass
class MatchResult:
    """How many boxes each side found, how many pairs matched, and the pairs (index in a, index in b, IoU)."""

    n_a: int
    n_b: int
    matched: int
    pairs: list[tuple[int, int, float]]

    def summary(self, name_a: str = "A", name_b: str = "B", iou_thres: float = 0.5) -> str:
        return (f"{name_a}: {self.n_a} boxes, {name_b}: {self.n_b} boxes, {self.matched} matched "
                f"(IoU >= {iou_thres:g}, same class)")


def match_detections(a: torch.Tensor, b: torch.Tensor, iou_thres: float = 0.5) -> MatchResult:
    """Greedily pair (n, 6) [x1, y1, x2, y2, conf, cls] detections of the same class, highest IoU first.

    Each box takes part in at most one pair, and a pair needs IoU >= ``iou_thres``.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    if not n_a or not n_b:
        return MatchResult(n_a, n_b, 0, [])
    iou = box_iou(a[:, :4].float(), b[:, :4].float())
    iou[a[:, 5:6] != b[:, 5].view(1, -1)] = -1.0  # other class: never a pair
    rows, cols = torch.nonzero(iou >= iou_thres, as_tuple=True)
    order = iou[rows, cols].argsort(descending=True, stable=True)
    used_a, used_b, pairs = set(), set(), []
    for i, j in zip(rows[order].tolist(), cols[order].tolist()):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j, float(iou[i, j])))
    return MatchResult(n_a, n_b, len(pairs), pairs)
