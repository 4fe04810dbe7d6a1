"""Box conversions, IoU measures and letterbox rescaling (utils/boxes.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.boxes import (bbox_ioa, bbox_iou, box_iou, clip_boxes, scale_boxes, xywh2xyxy, xywhn2xyxy,
                         xyn2xy, xyxy2xywh, xyxy2xywhn)


def _random_xyxy(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    return torch.cat((xy, xy + wh), 1)


def test_xywh_xyxy_known_values_torch_and_numpy():
    xywh = [[5.0, 5.0, 2.0, 4.0], [10.0, 20.0, 6.0, 8.0]]
    xyxy = [[4.0, 3.0, 6.0, 7.0], [7.0, 16.0, 13.0, 24.0]]
    assert torch.equal(xywh2xyxy(torch.tensor(xywh)), torch.tensor(xyxy))
    out = xyxy2xywh(np.array(xyxy))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.array(xywh))


def test_conversions_do_not_modify_input_and_round_trip():
    boxes = _random_xyxy(50)
    before = boxes.clone()
    back = xywh2xyxy(xyxy2xywh(boxes))
    assert torch.equal(boxes, before)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(xywh2xyxy(xyxy2xywh(boxes.numpy())), boxes.numpy(), atol=1e-4)


def test_normalised_round_trip_with_padding():
    w, h, padw, padh = 320, 240, 16, 8
    xywhn = np.array([[0.5, 0.5, 0.25, 0.5], [0.1, 0.9, 0.2, 0.1]])
    pix = xywhn2xyxy(xywhn, w, h, padw, padh)
    np.testing.assert_allclose(pix[0], [0.375 * w + padw, 0.25 * h + padh, 0.625 * w + padw, 0.75 * h + padh])
    np.testing.assert_allclose(xyxy2xywhn(pix - [padw, padh, padw, padh], w, h), xywhn, atol=1e-12)


def test_xyxy2xywhn_clip_clips_the_input_in_place():
    boxes = np.array([[-10.0, 5.0, 50.0, 120.0]])
    out = xyxy2xywhn(boxes, w=40, h=100, clip=True, eps=1e-3)
    np.testing.assert_allclose(boxes, [[0.0, 5.0, 40 - 1e-3, 100 - 1e-3]])
    assert 0 <= out.min() and out.max() <= 1


def test_xyn2xy_segments():
    pts = torch.tensor([[0.5, 0.25], [1.0, 0.0]])
    assert torch.equal(xyn2xy(pts, w=100, h=200, padw=3, padh=4), torch.tensor([[53.0, 54.0], [103.0, 4.0]]))


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 1.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 2.0, 1.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    expected = torch.tensor([[25 / 175, 2 / 100, 0.0], [0.0, 0.5, 0.0]])
    torch.testing.assert_close(iou, expected, rtol=0, atol=1e-6)
    assert box_iou(a, a).diagonal().sub(1).abs().max() < 1e-6


def test_bbox_iou_variants():
    box = torch.tensor([5.0, 5.0, 2.0, 4.0])  # xywh
    same = bbox_iou(box, box[None], CIoU=True)
    assert same.shape == (1, 1) and abs(same.item() - 1) < 1e-5
    shifted = torch.tensor([[6.0, 5.0, 2.0, 4.0]])  # overlap 1 x 4, union 12
    assert abs(bbox_iou(box, shifted).item() - 4 / 12) < 1e-6
    # GIoU: enclosing box 3 x 4 = 12 = union, so GIoU == IoU
    assert abs(bbox_iou(box, shifted, GIoU=True).item() - 4 / 12) < 1e-6
    # DIoU: centre distance 1, enclosing diagonal^2 = 9 + 16
    assert abs(bbox_iou(box, shifted, DIoU=True).item() - (4 / 12 - 1 / 25)) < 1e-6
    far = torch.tensor([[50.0, 50.0, 2.0, 4.0]])
    assert bbox_iou(box, far, CIoU=True).item() < 0
    # corner format gives the same plain IoU
    xyxy = bbox_iou(xywh2xyxy(box[None]), xywh2xyxy(shifted), xywh=False)
    assert abs(xyxy.item() - 4 / 12) < 1e-5


def test_bbox_iou_ciou_penalises_aspect_ratio():
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    wide = torch.tensor([[0.0, 0.0, 8.0, 2.0]])  # same centre and area, different shape
    iou = bbox_iou(box, wide).item()
    ciou = bbox_iou(box, wide, CIoU=True).item()
    v = 4 / math.pi ** 2 * (math.atan(4) - math.atan(1)) ** 2
    assert ciou == pytest.approx(iou - v * v / (v - iou + 1), abs=1e-5)


def test_bbox_ioa():
    box = np.array([0.0, 0.0, 10.0, 10.0])
    others = np.array([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 2.0, 2.0], [20.0, 20.0, 21.0, 21.0]])
    np.testing.assert_allclose(bbox_ioa(box, others), [0.25, 1.0, 0.0], atol=1e-6)


def test_clip_boxes_tensor_and_numpy():
    t = torch.tensor([[-5.0, -1.0, 700.0, 500.0]])
    clip_boxes(t, (480, 640))
    assert t.tolist() == [[0.0, 0.0, 640.0, 480.0]]
    n = np.array([[-5.0, -1.0, 700.0, 500.0]])
    clip_boxes(n, (480, 640))
    assert n.tolist() == [[0.0, 0.0, 640.0, 480.0]]


def test_scale_boxes_from_shapes_letterbox():
    # 480x640 (h, w) image letterboxed into 640x640: gain 1, 80 px of padding top and bottom
    boxes = torch.tensor([[10.0, 90.0, 110.0, 300.0], [0.0, 0.0, 640.0, 640.0]])
    out = scale_boxes((640, 640), boxes, (480, 640))
    assert out is boxes  # in place, as val.py expects
    assert boxes.tolist() == [[10.0, 10.0, 110.0, 220.0], [0.0, 0.0, 640.0, 480.0]]


def test_scale_boxes_with_ratio_pad_and_downscale():
    # 1080x810 image resized by 0.5 into 540x405 then padded by (pad_w=17.5, pad_h=2) to 544x440
    ratio_pad = ((0.5, 0.5), (17.5, 2.0))
    boxes = np.array([[17.5 + 50, 2 + 100, 17.5 + 150, 2 + 300]])
    scale_boxes((544, 440), boxes, (1080, 810), ratio_pad)
    np.testing.assert_allclose(boxes, [[100.0, 200.0, 300.0, 600.0]])


def test_scale_boxes_writes_through_a_column_view():
    pred = torch.tensor([[20.0, 100.0, 60.0, 200.0, 0.9, 3.0]])
    scale_boxes((640, 640), pred[:, :4], (320, 640))  # gain 1, pad_h 160
    assert pred[0].tolist() == [20.0, 0.0, 60.0, 40.0, pytest.approx(0.9), 3.0]
