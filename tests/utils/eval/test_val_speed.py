"""Issue #7: the faster validation path gives exactly the old results and no per-image host reads."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import utils.eval.nms as nms_mod
from utils.boxes import box_iou, xywh2xyxy
from utils.eval.evaluate import EvalOptions, _labels_per_image, evaluate
from utils.eval.metrics import match_predictions, match_predictions_torch

IOUV = torch.linspace(0.5, 0.95, 10)


# ---- reference implementations: the per-image / per-threshold code this issue replaced ----------------

def _greedy_reference(detections: torch.Tensor, labels: torch.Tensor, iouv: torch.Tensor) -> np.ndarray:
    """Upstream process_batch: per threshold, pairs sorted by IoU descending, unique per detection,
    then unique per label (stable sorts, so equal IoUs have one defined order)."""
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if not detections.shape[0] or not labels.shape[0]:
        return correct
    iou = box_iou(labels[:, 1:], detections[:, :4])
    same_class = labels[:, 0:1] == detections[:, 5]
    for t in range(len(iouv)):
        x = torch.where((iou >= iouv[t]) & same_class)
        if not x[0].shape[0]:
            continue
        m = torch.cat((torch.stack(x, 1), iou[x[0], x[1]][:, None]), 1).numpy()
        if x[0].shape[0] > 1:
            m = m[m[:, 2].argsort(kind="stable")[::-1]]
            m = m[np.unique(m[:, 1], return_index=True)[1]]
            m = m[np.unique(m[:, 0], return_index=True)[1]]
        correct[m[:, 1].astype(int), t] = True
    return correct


def _nms_per_image_reference(prediction, conf_thres, iou_thres, classes=None, agnostic=False,
                             multi_label=False, labels=(), max_det=300, nm=0):
    """The per-image candidate extraction the batched one replaced (v7.0's loop body)."""
    nc = prediction.shape[2] - nm - 5
    mi, multi_label = 5 + nc, multi_label and nc > 1
    output = [torch.zeros((0, 6 + nm))] * prediction.shape[0]
    for xi, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres]
        if labels and len(labels[xi]):
            lb = labels[xi]
            v = torch.zeros((len(lb), 5 + nc + nm))
            v[:, :4], v[:, 4] = lb[:, 1:5], 1.0
            v[torch.arange(len(lb)), lb[:, 0].long() + 5] = 1.0
            x = torch.cat((x, v), 0)
        if not x.shape[0]:
            continue
        x[:, 5:] *= x[:, 4:5]
        box, mask = xywh2xyxy(x[:, :4]), x[:, mi:]
        if multi_label:
            i, j = (x[:, 5:mi] > conf_thres).nonzero(as_tuple=False).T
            x = torch.cat((box[i], x[i, 5 + j, None], j[:, None].float(), mask[i]), 1)
        else:
            conf, j = x[:, 5:mi].max(1, keepdim=True)
            x = torch.cat((box, conf, j.float(), mask), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            x = x[(x[:, 5:6] == torch.tensor(classes)).any(1)]
        if not x.shape[0]:
            continue
        x = x[x[:, 4].argsort(descending=True)[:nms_mod.MAX_NMS]]
        offset = x[:, 5:6] * (0 if agnostic else nms_mod.MAX_WH)
        output[xi] = x[nms_mod.nms_indices(x[:, :4] + offset, x[:, 4], iou_thres, max_keep=max_det)[:max_det]]
    return output


# ---- matching --------------------------------------------------------------------------------------------

def _grid_boxes(rng, n, grid):
    """Boxes with integer corners on a small grid: equal IoUs (ties) and duplicates are frequent."""
    lo = rng.integers(0, grid, (n, 2))
    hi = lo + rng.integers(1, grid, (n, 2))
    return np.concatenate((lo, hi), 1).astype(np.float32)


def _random_case(rng):
    n, m, nc = int(rng.integers(0, 30)), int(rng.integers(0, 12)), int(rng.integers(1, 4))
    grid = int(rng.choice([3, 5, 20]))
    labels = np.concatenate((rng.integers(0, nc, (m, 1)), _grid_boxes(rng, m, grid)), 1).astype(np.float32)
    if m > 1 and rng.random() < 0.3:
        labels[-1] = labels[0]  # duplicate label, as some datasets have
    dets = np.concatenate((_grid_boxes(rng, n, grid), rng.random((n, 1)), rng.integers(0, nc, (n, 1))), 1)
    dets = torch.from_numpy(dets.astype(np.float32))
    if rng.random() < 0.2:
        dets = dets.double()
    return dets, torch.from_numpy(labels)


def _thresholds(rng, dets, labels):
    """Default grid, or thresholds equal to IoUs that occur (tests the >= boundary)."""
    if rng.random() < 0.5 or not dets.shape[0] or not labels.shape[0]:
        return IOUV
    iou = box_iou(labels[:, 1:], dets[:, :4]).flatten()
    return torch.sort(iou[torch.from_numpy(rng.integers(0, len(iou), 10))]).values.float()


def _has_tie(dets, labels):
    """Some detection has two same-class labels at its best IoU (> 0)."""
    if not dets.shape[0] or not labels.shape[0]:
        return False
    iou = box_iou(labels[:, 1:], dets[:, :4]) * (labels[:, 0:1] == dets[:, 5])
    best = iou.max(0).values
    return bool(((iou == best) & (best > 0)).sum(0).gt(1).any())


def test_torch_matcher_equals_greedy_reference_on_random_cases():
    rng = np.random.default_rng(7)
    ties = 0
    for case in range(1500):
        dets, labels = _random_case(rng)
        iouv = _thresholds(rng, dets, labels)
        ties += _has_tie(dets, labels)
        got = match_predictions_torch(dets, labels, iouv)
        assert got.dtype == torch.bool and got.shape == (dets.shape[0], len(iouv))
        np.testing.assert_array_equal(got.numpy(), _greedy_reference(dets, labels, iouv), err_msg=f"case {case}")
    assert ties > 100  # the cases really exercise equal IoUs


def test_torch_matcher_tie_goes_to_highest_label():
    # d0 overlaps labels 0 and 1 equally; d1's best label is 0. d0 takes label 1 (the later pair
    # comes first in a reversed stable sort), so d1 keeps label 0 and both are correct.
    labels = torch.tensor([[0.0, 0, 0, 10, 10], [0.0, 5, 0, 15, 10]])
    dets = torch.tensor([[2.5, 0, 12.5, 10, 0.9, 0], [0, 0, 10, 9, 0.8, 0]])
    got = match_predictions_torch(dets, labels, IOUV)
    assert got[:, 0].tolist() == [True, True]
    np.testing.assert_array_equal(got.numpy(), _greedy_reference(dets, labels, IOUV))


def test_torch_matcher_edge_cases():
    det = torch.tensor([[0.0, 0, 10, 10, 0.9, 1]])
    assert match_predictions_torch(torch.zeros(0, 6), torch.tensor([[0.0, 0, 0, 1, 1]]), IOUV).shape == (0, 10)
    assert not match_predictions_torch(det, torch.zeros(0, 5), IOUV).any()
    assert not match_predictions_torch(det, torch.tensor([[0.0, 0, 0, 10, 10]]), IOUV).any()  # other class
    half = match_predictions_torch(det.half(), torch.tensor([[1.0, 0, 0, 10, 10]]), IOUV)
    assert half.all()
    assert isinstance(match_predictions(det, torch.tensor([[1.0, 0, 0, 10, 10]]), IOUV), np.ndarray)


# ---- NMS -------------------------------------------------------------------------------------------------

def _random_prediction(gen, bs, anchors, nc, nm):
    p = torch.rand(bs, anchors, 5 + nc + nm, generator=gen)
    p[..., :2] *= 64
    p[..., 2:4] = p[..., 2:4] * 16 + 1
    p[..., 4:5 + nc] = (p[..., 4:5 + nc] * 8).round() / 8  # few distinct scores: many equal confidences
    p[1, :, 4] = 0  # an image without candidates
    return p


@pytest.mark.parametrize("multi_label, agnostic, classes, nm, with_labels", [
    (True, False, None, 0, False), (False, False, None, 0, False), (True, True, None, 0, False),
    (True, False, [0, 2], 0, False), (False, False, None, 4, True), (True, False, None, 0, True),
])
def test_batched_candidates_match_per_image_nms(multi_label, agnostic, classes, nm, with_labels):
    gen = torch.Generator().manual_seed(3)
    nc = 3
    for _ in range(4):
        p = _random_prediction(gen, 4, 200, nc, nm)
        labels = ()
        if with_labels:
            labels = [torch.tensor([[1.0, 20, 20, 8, 8]]), torch.tensor([[2.0, 9, 9, 5, 5]]), torch.zeros(0, 5),
                      torch.tensor([[0.0, 5, 5, 4, 4], [2.0, 30, 30, 9, 9]])]
        kw = {"classes": classes, "agnostic": agnostic, "multi_label": multi_label, "labels": labels,
              "max_det": 25, "nm": nm}
        got = nms_mod.non_max_suppression(p.clone(), 0.3, 0.45, **kw)
        want = _nms_per_image_reference(p.clone(), 0.3, 0.45, **kw)
        assert len(got) == len(want) == 4 and got[1].shape[0] == (1 if with_labels else 0)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_nms_leaves_prediction_untouched():
    p = _random_prediction(torch.Generator().manual_seed(0), 2, 50, 3, 0)
    before = p.clone()
    nms_mod.non_max_suppression(p, 0.1, 0.5, multi_label=True)
    assert torch.equal(p, before)


# ---- evaluate --------------------------------------------------------------------------------------------

def test_labels_per_image_equals_mask_selection():
    gen = torch.Generator().manual_seed(1)
    targets = torch.cat((torch.tensor([3, 0, 3, 1, 0, 3, 3], dtype=torch.float32)[:, None],
                         torch.rand(7, 5, generator=gen)), 1)  # unsorted; image 2 has none
    split = _labels_per_image(targets, 5)
    assert len(split) == 5
    for si, labels in enumerate(split):
        assert torch.equal(labels, targets[targets[:, 0] == si, 1:])


_HOST_READS = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.bincount.default,
               torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


class _HostReadCounter(TorchDispatchMode):
    """Counts ops that make a CUDA device wait for the host (visible here on the CPU as well)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in _HOST_READS or bool_index:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _device_only_nms(boxes, scores, iou_thres, backend=None, max_keep=None):
    return torch.arange(min(boxes.shape[0], max_keep or boxes.shape[0]))  # no host reads, unlike real NMS


class _FakeModel:
    def __init__(self, nc):
        self.nc, self.gen = nc, torch.Generator().manual_seed(5)

    def __call__(self, im):
        """Random rows, plus each image's label box as a sure detection (image 1: nothing at all)."""
        bs = im.shape[0]
        p = _random_prediction(self.gen, bs, 60, self.nc, 0)
        hit = [i for i in range(bs) if i != 1]
        p[hit, 0, :5] = torch.tensor([32, 32, 25.6, 19.2, 1.0])
        p[hit, 0, 5:] = 0
        p[hit, 0, [5 + i % self.nc for i in hit]] = 1.0
        return p, None


def _batch(bs, size=64):
    targets = torch.tensor([[i, i % 3, 0.5, 0.5, 0.4, 0.3] for i in range(bs) if i != 2], dtype=torch.float32)
    shapes = [((size, size), ((1.0, 1.0), (0.0, 0.0)))] * bs
    return torch.zeros(bs, 3, size, size, dtype=torch.uint8), targets, [f"im{i}.jpg" for i in range(bs)], shapes


@pytest.mark.parametrize("part", ["nms", "evaluate"])
def test_host_reads_do_not_grow_with_images_per_batch(part, monkeypatch):
    monkeypatch.setattr(nms_mod, "nms_indices", _device_only_nms)
    totals = []
    for bs in (2, 8):
        with _HostReadCounter() as counter:
            if part == "nms":
                nms_mod.non_max_suppression(_random_prediction(torch.Generator().manual_seed(0), bs, 60, 3, 0),
                                            0.001, 0.6, multi_label=True)
            else:
                evaluate(_FakeModel(3), [_batch(bs)], torch.device("cpu"), 3, {0: "a", 1: "b", 2: "c"})
        totals.append(sum(counter.counts.values()))
    assert totals[0] == totals[1], totals
    assert 0 < totals[0] <= 6


def test_evaluate_gives_same_result_for_shuffled_targets(monkeypatch):
    names = {0: "a", 1: "b", 2: "c"}
    im, targets, paths, shapes = _batch(6)
    shuffled = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(2))]
    runs = [evaluate(_FakeModel(3), [(im, t.clone(), paths, shapes)], torch.device("cpu"), 3, names,
                     EvalOptions(conf_thres=0.3)) for t in (targets, shuffled)]
    assert runs[0].seen == 6 and runs[0].instances.sum() == 5
    assert [(r.mp, r.mr, r.map50, r.map) for r in runs[:1]] == [(r.mp, r.mr, r.map50, r.map) for r in runs[1:]]
    assert runs[0].map50 > 0  # the fake detections do match some labels
