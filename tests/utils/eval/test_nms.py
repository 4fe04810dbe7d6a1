"""NMS kernels, backend dispatch and YOLOv5 batch NMS (utils/eval/nms.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import utils.eval.nms as nms_mod
from utils.eval.nms import MAX_WH, nms_backend, nms_indices, non_max_suppression


@pytest.fixture
def fresh_probe():
    """Forget the cached torchvision probe before and after a test that fakes torchvision."""
    nms_mod._torchvision_nms.cache_clear()
    yield
    nms_mod._torchvision_nms.cache_clear()


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """Textbook greedy NMS in plain Python: stable by-score order, drop IoU strictly above thr."""
    b = boxes.double().tolist()
    order = sorted(range(len(b)), key=lambda i: -float(scores[i]))  # sorted() is stable
    keep, dropped = [], set()
    for pos, i in enumerate(order):
        if i in dropped:
            continue
        keep.append(i)
        for j in order[pos + 1:]:
            iw = max(0.0, min(b[i][2], b[j][2]) - max(b[i][0], b[j][0]))
            ih = max(0.0, min(b[i][3], b[j][3]) - max(b[i][1], b[j][1]))
            inter = iw * ih
            union = (b[i][2] - b[i][0]) * (b[i][3] - b[i][1]) + (b[j][2] - b[j][0]) * (b[j][3] - b[j][1]) - inter
            if union > 0 and inter / union > thr:
                dropped.add(j)
    return keep


def _random_boxes(g: torch.Generator, n: int, clustered: bool):
    if clustered:  # a few clusters of heavily overlapping boxes
        centres = torch.rand(max(n // 20, 1), 2, generator=g) * 200
        xy = centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 3
        wh = 40 + torch.randn(n, 2, generator=g) * 4
    else:
        xy = torch.rand(n, 2, generator=g) * 300
        wh = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat((xy, xy + wh.abs() + 0.5), 1)
    scores = (torch.rand(n, generator=g) * 8).floor() / 8  # few distinct values: many ties
    return boxes, scores


@pytest.mark.parametrize("clustered", [False, True])
def test_pure_nms_matches_reference(clustered):
    g = torch.Generator().manual_seed(1 + clustered)
    for trial in range(12):
        n = int(torch.randint(1, 400, (1,), generator=g))
        boxes, scores = _random_boxes(g, n, clustered)
        for thr in (0.3, 0.45, 0.7):
            got = nms_indices(boxes, scores, thr, backend="torch")
            assert got.dtype == torch.long
            assert got.tolist() == reference_nms(boxes, scores, thr), (trial, n, thr)


def test_pure_nms_crosses_block_boundaries():
    # more boxes than one internal block, so suppression must carry from block to block
    g = torch.Generator().manual_seed(7)
    boxes, scores = _random_boxes(g, 3 * nms_mod._BLOCK + 17, clustered=True)
    scores = torch.rand(len(scores), generator=g)
    got = nms_indices(boxes, scores, 0.5, backend="torch")
    assert got.tolist() == reference_nms(boxes, scores, 0.5)
    first = nms_indices(boxes, scores, 0.5, backend="torch", max_keep=5)
    assert first.tolist() == got[:5].tolist()


def test_pure_nms_threshold_is_strict_and_ties_keep_input_order():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert nms_indices(boxes, scores, 0.5, backend="torch").tolist() == [0, 1]
    assert nms_indices(boxes, scores, 0.49, backend="torch").tolist() == [0]
    tied = torch.tensor([0.5, 0.5])
    assert nms_indices(boxes.flip(0), tied, 0.3, backend="torch").tolist() == [0]
    assert nms_indices(boxes, tied, 0.3, backend="torch").tolist() == [0]


def test_pure_nms_empty_and_degenerate_boxes():
    empty = nms_indices(torch.zeros(0, 4), torch.zeros(0), 0.5, backend="torch")
    assert empty.dtype == torch.long and empty.numel() == 0
    # two zero-area boxes have IoU 0/0 = NaN, which must not suppress (as torchvision)
    points = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert nms_indices(points, torch.tensor([0.9, 0.8]), 0.5, backend="torch").tolist() == [0, 1]


def test_float32_threshold_matches_double_comparison():
    for thr in (0.45, 0.5, 0.6, 0.65, 0.7):
        t = nms_mod._threshold_in(torch.float32, thr)
        assert t <= thr
        above = np.nextafter(np.float32(t), np.float32(np.inf))
        assert float(np.float32(t)) == t and float(above) > thr


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="backend"):
        nms_indices(torch.zeros(1, 4), torch.zeros(1), 0.5, backend="cuda")
    with pytest.raises(ValueError, match="boxes"):
        nms_indices(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="conf_thres"):
        non_max_suppression(torch.zeros(1, 1, 6), conf_thres=1.5)
    with pytest.raises(ValueError, match="iou_thres"):
        non_max_suppression(torch.zeros(1, 1, 6), iou_thres=-0.1)


def test_dispatch_falls_back_when_import_raises_import_error(fresh_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    assert nms_backend() == "torch"
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    assert nms_indices(boxes, torch.tensor([0.8, 0.9]), 0.5).tolist() == [1]
    with pytest.raises(RuntimeError, match="unavailable"):
        nms_indices(boxes, torch.tensor([0.8, 0.9]), 0.5, backend="torchvision")


def test_dispatch_falls_back_when_import_raises_runtime_error(fresh_probe, monkeypatch, tmp_path):
    # a torchvision built for another torch fails like this while registering its operators
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nms_backend() == "torch"
    boxes, scores = _random_boxes(torch.Generator().manual_seed(3), 100, clustered=True)
    assert nms_indices(boxes, scores, 0.45).tolist() == reference_nms(boxes, scores, 0.45)


def test_dispatch_uses_a_working_torchvision(fresh_probe, monkeypatch):
    """With a working torchvision, both backends agree; without one, the probe says 'torch'."""
    if nms_backend() == "torch":
        # no usable torchvision here: a fake working module must then be picked up
        calls = []

        def fake_nms(boxes, scores, thr):
            calls.append(len(boxes))
            return nms_mod._nms_torch(boxes, scores, thr)

        monkeypatch.setattr(nms_mod, "_torchvision_nms", lambda: fake_nms)
        assert nms_backend() == "torchvision"
        nms_indices(torch.zeros(2, 4), torch.zeros(2), 0.5)
        assert calls == [2]
        return
    g = torch.Generator().manual_seed(11)
    for clustered in (False, True):
        boxes, scores = _random_boxes(g, 500, clustered)
        scores = torch.rand(len(scores), generator=g)  # torchvision's tie order is its own business
        assert torch.equal(nms_indices(boxes, scores, 0.45, backend="torchvision"),
                           nms_indices(boxes, scores, 0.45, backend="torch"))


def _prediction(rows: list[list[float]], nc: int) -> torch.Tensor:
    """One image's raw rows [x, y, w, h, obj, cls scores...] as a (1, n, 5 + nc) batch."""
    t = torch.tensor(rows, dtype=torch.float32)
    assert t.shape[1] == 5 + nc
    return t[None]


def test_nms_conf_filter_and_best_class():
    pred = _prediction([
        [50, 50, 20, 20, 0.9, 0.1, 0.8, 0.05],  # conf 0.72, class 1
        [150, 150, 20, 20, 0.2, 0.9, 0.1, 0.1],  # obj below 0.25: never a candidate
        [250, 250, 20, 20, 0.5, 0.4, 0.3, 0.2],  # conf 0.2 < 0.25 after obj * cls
    ], nc=3)
    (out,) = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.45)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0], torch.tensor([40.0, 40.0, 60.0, 60.0, 0.72, 1.0]))


def test_nms_multi_label_keeps_every_class_above_threshold():
    pred = _prediction([[50, 50, 20, 20, 0.9, 0.6, 0.5, 0.1]], nc=3)
    (single,) = non_max_suppression(pred.clone(), conf_thres=0.3)
    (multi,) = non_max_suppression(pred.clone(), conf_thres=0.3, multi_label=True)
    assert single[:, 5].tolist() == [0.0]
    assert multi[:, 5].tolist() == [0.0, 1.0]  # same box, two classes, sorted by conf
    torch.testing.assert_close(multi[:, 4], torch.tensor([0.54, 0.45]))
    # multi-label means nothing with one class
    one = _prediction([[50, 50, 20, 20, 0.9, 0.6]], nc=1)
    assert non_max_suppression(one, conf_thres=0.3, multi_label=True)[0].shape[0] == 1


def test_nms_class_offset_and_agnostic():
    pred = _prediction([
        [50, 50, 20, 20, 0.9, 0.9, 0.0],  # class 0
        [51, 50, 20, 20, 0.8, 0.0, 0.9],  # same place, class 1
        [50, 51, 20, 20, 0.7, 0.9, 0.0],  # same place, class 0 again: suppressed
    ], nc=2)
    (aware,) = non_max_suppression(pred.clone(), conf_thres=0.1, iou_thres=0.5)
    assert aware[:, 5].tolist() == [0.0, 1.0]
    (agnostic,) = non_max_suppression(pred.clone(), conf_thres=0.1, iou_thres=0.5, agnostic=True)
    assert agnostic.shape[0] == 1 and agnostic[0, 5].item() == 0.0
    (only1,) = non_max_suppression(pred.clone(), conf_thres=0.1, classes=[1])
    assert only1[:, 5].tolist() == [1.0]
    assert MAX_WH == 7680


def test_nms_max_det_batch_and_tuple_input():
    g = torch.Generator().manual_seed(5)
    n = 400
    xy = torch.rand(n, 2, generator=g) * 4000  # spread out: NMS removes few
    rows = torch.cat((xy, torch.full((n, 2), 10.0), torch.rand(n, 1, generator=g) * 0.5 + 0.5,
                      torch.rand(n, 4, generator=g)), 1)
    pred = torch.stack((rows, torch.zeros_like(rows)))  # second image: nothing above threshold
    out = non_max_suppression((pred, None), conf_thres=0.01, iou_thres=0.45, max_det=37)
    assert len(out) == 2
    assert out[0].shape == (37, 6) and out[1].shape == (0, 6)
    assert torch.all(out[0][:-1, 4] >= out[0][1:, 4])
    full = non_max_suppression(pred, conf_thres=0.01, iou_thres=0.45, max_det=1000)[0]
    assert full.shape[0] > 37 and torch.equal(full[:37], out[0])


def test_nms_apriori_labels_are_added():
    pred = _prediction([[50, 50, 20, 20, 0.9, 0.9, 0.1]], nc=2)
    labels = [torch.tensor([[1.0, 300, 300, 40, 40]])]
    (out,) = non_max_suppression(pred, conf_thres=0.25, labels=labels)
    assert sorted(out[:, 5].tolist()) == [0.0, 1.0]
    assert out[out[:, 5] == 1][0, :5].tolist() == [280.0, 280.0, 320.0, 320.0, 1.0]
