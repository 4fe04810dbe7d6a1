"""utils.eval.box_match (detect.py --compare) and utils.eval.annotate drawing."""
from __future__ import annotations

import numpy as np
import torch

from utils.eval.annotate import default_line_width, draw_detections, save_crop, side_by_side
from utils.eval.box_match import match_detections


def test_matching_is_one_to_one_same_class_and_thresholded():
    a = torch.tensor([[0, 0, 10, 10, 0.9, 1], [0, 0, 10, 10, 0.8, 1], [50, 50, 60, 60, 0.7, 2],
                      [100, 100, 110, 110, 0.6, 3]], dtype=torch.float32)
    b = torch.tensor([[0, 0, 10, 11, 0.9, 1], [50, 50, 60, 60, 0.7, 0], [100, 100, 110, 130, 0.6, 3]],
                     dtype=torch.float32)
    result = match_detections(a, b)
    assert (result.n_a, result.n_b, result.matched) == (4, 3, 1)  # other class; IoU 1/3 < 0.5
    assert result.pairs[0][:2] == (0, 0)
    assert match_detections(a, b, iou_thres=0.3).matched == 2
    assert match_detections(a, b[:0]).matched == 0
    assert result.summary("f.pt", "q.onnx") == "f.pt: 4 boxes, q.onnx: 3 boxes, 1 matched (IoU >= 0.5, same class)"


def test_drawing_crops_and_side_by_side(tmp_path):
    im = np.zeros((100, 200, 3), np.uint8)
    boxes = torch.tensor([[20.0, 30.0, 80.0, 90.0, 0.9, 0.0]])
    drawn = draw_detections(im.copy(), boxes, {0: "person"}, line_width=2)
    assert drawn.any() and not drawn[95:, :].any()  # drawn around the box only
    assert default_line_width(im) == 2
    crop = save_crop(boxes[0, :4].tolist(), np.full((100, 200, 3), 7, np.uint8), tmp_path / "crops" / "a.jpg")
    assert crop.name == "a.jpg" and save_crop([0, 0, 5, 5], im, tmp_path / "crops" / "a.jpg").name == "a2.jpg"
    pair = side_by_side(drawn, im, ("left", "right model"))
    assert pair.shape[1] == 2 * 200 + 8 and pair.shape[0] > 100
