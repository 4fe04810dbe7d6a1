"""AP, P/R at best F1, prediction matching and the confusion matrix (utils/eval/metrics.py, utils/eval/plots.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.eval.metrics import (ConfusionMatrix, ap_per_class, compute_ap, fitness, match_predictions, pr_curves,
                           smooth)
from utils.eval.plots import plot_confusion_matrix, plot_pr_curves

IOUV = torch.linspace(0.5, 0.95, 10)


# ---- independent references written plainly, loop by loop ---------------------------------------

def ref_interp(x: float, xs: list[float], ys: list[float], left: float) -> float:
    """Piecewise-linear value at x through increasing xs; where xs repeats, the last point counts."""
    if x < xs[0]:
        return left
    j = max(k for k in range(len(xs)) if xs[k] <= x)
    if j == len(xs) - 1:
        return ys[j]
    return ys[j] + (ys[j + 1] - ys[j]) * (x - xs[j]) / (xs[j + 1] - xs[j])


def ref_ap(recall: list[float], precision: list[float]) -> float:
    """COCO 101-point AP: envelope of precision, sampled at recall 0, .01, ..., 1, trapezoid rule."""
    mrec = [0.0] + list(recall) + [1.0]
    mpre = [1.0] + list(precision) + [0.0]
    env = [max(mpre[k:]) for k in range(len(mpre))]
    xs = [k / 100 for k in range(101)]
    ys = [ref_interp(x, mrec, env, left=1.0) for x in xs]
    return sum((xs[k + 1] - xs[k]) * (ys[k + 1] + ys[k]) / 2 for k in range(100))


def ref_curves(tp_col, conf, n_labels):
    """Precision and recall after each prediction, predictions in decreasing confidence."""
    order = sorted(range(len(conf)), key=lambda k: -conf[k])
    tps = fps = 0
    rec, pre, confs = [], [], []
    for k in order:
        tps += int(tp_col[k])
        fps += 1 - int(tp_col[k])
        rec.append(tps / n_labels)
        pre.append(tps / (tps + fps))
        confs.append(conf[k])
    return rec, pre, confs


# ---- small pieces ------------------------------------------------------------------------------

def test_fitness_weights():
    x = np.array([[1.0, 1.0, 0.5, 0.3], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(fitness(x), [0.05 + 0.27, 1.0])
    one = (0.4, 0.3, 0.61, 0.43, 0.1, 0.2, 0.3)  # one validation result, as training passes it
    assert isinstance(fitness(one), float) and fitness(one) == 0.1 * 0.61 + 0.9 * 0.43


def test_smooth_window_and_edges():
    y = np.arange(20, dtype=float)
    s = smooth(y, 0.1)  # window round(20 * 0.1 * 2) // 2 + 1 = 3
    assert s.shape == y.shape
    np.testing.assert_allclose(s[1:-1], y[1:-1])  # a line is its own moving average
    assert s[0] == pytest.approx((0 + 0 + 1) / 3) and s[-1] == pytest.approx((18 + 19 + 19) / 3)


@pytest.mark.parametrize("recall, precision, expected", [
    ([0.5, 1.0], [1.0, 1.0], 0.995),  # perfect detector: upstream's sentinel makes it 0.995, not 1
    ([0.5], [1.0], 0.75),  # finds half the objects, never wrong: 0.5 + triangle to (1, 0)
    ([0.25, 0.5], [1.0, 0.5], 0.25 + 0.25 * 0.75 + 0.5 * 0.25),  # 1 to r=.25, down to .5 at r=.5, to 0 at r=1
    ([0.0], [0.0], 0.0),
])
def test_compute_ap_known_answers(recall, precision, expected):
    ap, mpre, mrec = compute_ap(np.array(recall), np.array(precision))
    assert ap == pytest.approx(expected, abs=1e-12)
    assert mrec[0] == 0 and mrec[-1] == 1 and np.all(np.diff(mpre) <= 0)


def test_compute_ap_matches_reference_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(20):
        hits = rng.random(30) < 0.6
        tpc = np.cumsum(hits)
        recall = tpc / (hits.sum() + rng.integers(0, 5))
        precision = tpc / np.arange(1, 31)
        ap, _, _ = compute_ap(recall, precision)
        assert ap == pytest.approx(ref_ap(recall.tolist(), precision.tolist()), abs=1e-12)


# ---- ap_per_class --------------------------------------------------------------------------------

def test_ap_per_class_perfect_detector():
    tp = np.ones((4, 10), dtype=bool)
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    pred_cls = np.array([0, 0, 1, 1])
    target_cls = np.array([0, 0, 1, 1])
    tp_n, fp_n, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 1]
    np.testing.assert_allclose(ap, 0.995)
    np.testing.assert_allclose(p, 1.0)
    np.testing.assert_allclose(r, 1.0, atol=1e-12)
    assert tp_n.tolist() == [2, 2] and fp_n.tolist() == [0, 0]


def _synthetic_case(seed: int = 3):
    rng = np.random.default_rng(seed)
    n = 60
    tp = rng.random((n, 10)) < np.linspace(0.8, 0.2, 10)  # harder thresholds: fewer hits
    tp &= tp[:, :1]  # a hit at a strict threshold is also a hit at 0.5
    conf = rng.random(n)
    pred_cls = rng.integers(0, 3, n)
    # more labels than hits per class, as in real data (recall never exceeds 1)
    target_cls = np.concatenate([np.full(k, c) for c, k in ((0, 25), (1, 21), (2, 30), (4, 3))])
    return tp, conf, pred_cls, target_cls


def test_ap_per_class_matches_independent_reference():
    tp, conf, pred_cls, target_cls = _synthetic_case()
    tp_n, fp_n, p, r, f1, ap, classes = ap_per_class(tp, conf, pred_cls, target_cls)
    assert classes.tolist() == [0, 1, 2, 4]  # classes with labels; class 4 has no predictions
    np.testing.assert_array_equal(ap[3], 0.0)
    assert p[3] == 0 and r[3] == 0
    px = np.linspace(0, 1, 1000)
    pr_grid = []
    for ci, c in enumerate([0, 1, 2]):
        sel = pred_cls == c
        n_labels = int((target_cls == c).sum())
        for t in range(10):
            rec, pre, _ = ref_curves(tp[sel, t], conf[sel].tolist(), n_labels)
            assert ap[ci, t] == pytest.approx(ref_ap(rec, pre), abs=1e-9), (c, t)
        rec, pre, confs = ref_curves(tp[sel, 0], conf[sel].tolist(), n_labels)
        neg = [-c_ for c_ in confs]
        r_c = [ref_interp(-x, neg, rec, left=0.0) for x in px]
        p_c = [ref_interp(-x, neg, pre, left=1.0) for x in px]
        pr_grid.append((p_c, r_c))
    # P and R are read where the (smoothed) mean F1 over classes peaks
    f1_grid = np.array([[2 * a * b / (a + b + 1e-16) for a, b in zip(p_c, r_c)] for p_c, r_c in pr_grid]
                       + [[0.0] * 1000])
    best = smooth(f1_grid.mean(0), 0.1).argmax()
    np.testing.assert_allclose(p[:3], [g[0][best] for g in pr_grid], atol=1e-9)
    np.testing.assert_allclose(r[:3], [g[1][best] for g in pr_grid], atol=1e-9)
    nt = np.array([25, 21, 30, 3])
    np.testing.assert_array_equal(tp_n, np.round(r * nt))
    np.testing.assert_array_equal(fp_n, np.round(tp_n / (p + 1e-16) - tp_n))
    np.testing.assert_allclose(f1, 2 * p * r / (p + r + 1e-16))


def test_ap_per_class_writes_plots(tmp_path):
    tp, conf, pred_cls, target_cls = _synthetic_case()
    curves, _ = pr_curves(tp, conf, pred_cls, target_cls)
    plot_pr_curves(curves, tmp_path, names={0: "cat", 1: "dog", 2: "cow", 3: "unused", 4: "owl"}, prefix="x_")
    for name in ("PR", "F1", "P", "R"):
        assert (tmp_path / f"x_{name}_curve.png").stat().st_size > 1000


# ---- match_predictions -----------------------------------------------------------------------------

def _det(box, conf, cls):
    return [*box, conf, cls]


def test_match_predictions_iou_thresholds_and_class():
    labels = torch.tensor([[0.0, 0, 0, 100, 100]])
    dets = torch.tensor([
        _det([0, 0, 100, 72], 0.9, 0),  # IoU 0.72 with the label
        _det([0, 0, 100, 100], 0.8, 1),  # perfect box, wrong class
    ])
    correct = match_predictions(dets, labels, IOUV)
    assert correct.dtype == bool and correct.shape == (2, 10)
    assert correct[0].tolist() == [True] * 5 + [False] * 5  # 0.50 ... 0.70 <= 0.72
    assert not correct[1].any()


def test_match_predictions_one_label_matched_once():
    labels = torch.tensor([[3.0, 0, 0, 100, 100]])
    dets = torch.tensor([_det([0, 0, 100, 100], 0.9, 3), _det([0, 0, 100, 99], 0.8, 3)])
    correct = match_predictions(dets, labels, IOUV)
    assert correct[0].all() and not correct[1].any()  # the duplicate is a false positive
    assert (correct.sum(0) <= 1).all()


def test_match_predictions_follows_upstream_label_dedup_order():
    # Upstream keeps, per label, the candidate with the lowest detection index (not the best IoU)
    # once each detection has its own best pair: here d0 (IoU 0.6) wins the label at 0.5-0.6 and
    # d1 (IoU 0.9) only where d0 is no longer a candidate.
    labels = torch.tensor([[0.0, 0, 0, 100, 100]])
    dets = torch.tensor([_det([0, 0, 100, 60], 0.9, 0), _det([0, 0, 100, 90], 0.8, 0)])
    correct = match_predictions(dets, labels, IOUV)
    assert correct[0].tolist() == [True] * 3 + [False] * 7
    assert correct[1].tolist() == [False] * 3 + [True] * 6 + [False]


def test_match_predictions_two_labels_one_detection():
    labels = torch.tensor([[0.0, 0, 0, 100, 100], [0.0, 0, 0, 100, 80]])
    dets = torch.tensor([_det([0, 0, 100, 85], 0.9, 0), _det([500, 500, 600, 600], 0.5, 0)])
    correct = match_predictions(dets, labels, IOUV)
    # IoU 0.85 with the first label, 0.94 with the second: either way correct up to 0.90
    assert correct[0].tolist() == [True] * 9 + [False]
    assert not correct[1].any()


def test_match_predictions_empty_inputs():
    assert match_predictions(torch.zeros(0, 6), torch.tensor([[0.0, 0, 0, 1, 1]]), IOUV).shape == (0, 10)
    assert not match_predictions(torch.tensor([_det([0, 0, 1, 1], 0.5, 0)]), torch.zeros(0, 5), IOUV).any()


# ---- confusion matrix --------------------------------------------------------------------------------

def test_confusion_matrix_counts_and_tp_fp(tmp_path):
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([
        [0.0, 0, 0, 100, 100],  # A: found as class 0
        [1.0, 200, 200, 300, 300],  # B: found but called class 0
        [1.0, 400, 400, 450, 450],  # C: missed
    ])
    dets = torch.tensor([
        _det([2, 2, 100, 100], 0.9, 0),
        _det([205, 200, 300, 305], 0.8, 0),
        _det([600, 600, 700, 700], 0.7, 1),  # nothing there: background false positive
        _det([400, 400, 450, 450], 0.1, 1),  # below conf: ignored, C stays missed
    ])
    cm.process_batch(dets, labels)
    expected = np.zeros((3, 3))
    expected[0, 0] = 1  # A
    expected[0, 1] = 1  # B confused
    expected[2, 1] = 1  # C missed
    expected[1, 2] = 1  # background predicted as class 1
    np.testing.assert_array_equal(cm.matrix, expected)
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]

    cm.process_batch(None, torch.tensor([0.0, 1.0, 1.0]))  # image without detections
    assert cm.matrix[2].tolist() == [1, 3, 0]
    # detections that match nothing are background FPs even when nothing at all matched
    cm.process_batch(torch.tensor([_det([0, 0, 10, 10], 0.9, 0)]), torch.tensor([[1.0, 50, 50, 60, 60]]))
    assert cm.matrix[0, 2] == 1 and cm.matrix[2, 1] == 4

    out = plot_confusion_matrix(cm.matrix, save_dir=tmp_path, names=["a", "b"])
    assert out == tmp_path / "confusion_matrix.png" and out.stat().st_size > 1000


def test_confusion_matrix_one_detection_two_labels():
    cm = ConfusionMatrix(nc=1)
    labels = torch.tensor([[0.0, 0, 0, 100, 100], [0.0, 0, 0, 100, 90]])
    cm.process_batch(torch.tensor([_det([0, 0, 100, 95], 0.9, 0)]), labels)
    assert cm.matrix.tolist() == [[1, 0], [1, 0]]  # one matched, the other missed


# ---- plots -------------------------------------------------------------------------------------------

def test_plot_images_labels_and_predictions(tmp_path):
    import cv2

    from utils.eval.plots import plot_images

    images = torch.zeros(3, 3, 64, 96)  # black tiles, so any drawn pixel shows
    labels = torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5], [2, 0, 0.3, 0.3, 0.2, 0.2]])  # normalised xywh
    out = plot_images(images, labels, ["a/one.jpg", "two.jpg", "three.jpg"], tmp_path / "lab.jpg", {0: "x", 1: "y"})
    mosaic = cv2.imread(str(out))
    assert mosaic.shape[:2] == (2 * 64, 2 * 96)  # 3 images -> 2 x 2 grid at full size
    assert mosaic[64 + 5:, 96 + 5:].max() > 200  # the empty 4th tile stays white
    assert mosaic[20:44, 30:66].mean() < 60  # inside image 0's box: still mostly black

    preds = torch.tensor([[0, 1, 48, 32, 20, 20, 0.9], [1, 0, 48, 32, 20, 20, 0.1]])  # pixel xywh + conf
    out = plot_images(images * 255, preds, None, tmp_path / "pred.jpg")
    mosaic = cv2.imread(str(out)).astype(int)
    assert mosaic[:64, :96].sum() > 0  # conf 0.9 drawn in tile 0
    assert mosaic[3:61, 96 + 3:96 + 93].max() < 40  # conf 0.1 (<= 0.25) not drawn in tile 1
    assert plot_images(images, torch.zeros(0, 7), None, tmp_path / "none.jpg").exists()


def test_plot_results_from_upstream_csv(tmp_path):
    from utils.eval.plots import RESULTS_PANELS, plot_results

    columns = ["epoch", *RESULTS_PANELS[:3], *RESULTS_PANELS[3:5], *RESULTS_PANELS[8:], *RESULTS_PANELS[5:8],
               "x/lr0", "x/lr1", "x/lr2"]
    lines = [",".join("%20s" % c for c in columns)]
    lines += [",".join("%20.5g" % v for v in [e, *np.linspace(0.1, 0.9, len(columns) - 1) / (e + 1)]) for e in range(4)]
    csv_file = tmp_path / "results.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    out = plot_results(csv_file)
    assert out == tmp_path / "results.png" and out.stat().st_size > 1000
    (tmp_path / "bad.csv").write_text("epoch,foo\n0,1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        plot_results(tmp_path / "bad.csv")
