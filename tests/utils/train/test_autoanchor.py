"""Tests for utils.train.autoanchor: anchor order, the BPR check, k-means + genetic evolution."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from utils.train.autoanchor import check_anchor_order, check_anchors, kmean_anchors

# YOLOv5 v7.0 default anchors in pixels, P3/8, P4/16, P5/32.
V5_ANCHORS = np.array([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119],
                       [116, 90], [156, 198], [373, 326]], dtype=np.float32)
STRIDES = torch.tensor([8.0, 16.0, 32.0])


class FakeDetect(nn.Module):
    """Just what autoanchor reads from a Detect layer: grid-unit anchors and strides."""

    def __init__(self, pixel_anchors: np.ndarray):
        super().__init__()
        self.stride = STRIDES.clone()
        self.register_buffer("anchors", torch.tensor(pixel_anchors).view(3, 3, 2) / STRIDES.view(-1, 1, 1))


class FakeModel(nn.Module):
    def __init__(self, pixel_anchors: np.ndarray):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), FakeDetect(pixel_anchors))


def make_dataset(seed: int, n_img: int = 40, per_img: int = 6, base=V5_ANCHORS, size=(640, 480)):
    """Square-ish images with boxes drawn around ``base`` sizes (pixels at 640 long side)."""
    rng = np.random.default_rng(seed)
    w, h = size
    labels = []
    for _ in range(n_img):
        pick = base[rng.integers(0, len(base), per_img)] * rng.uniform(0.8, 1.25, (per_img, 2))
        wh = pick / 640.0  # normalised by the long side, which becomes 640
        wh = wh * np.array([max(w, h) / w, max(w, h) / h])
        xy = rng.uniform(0.3, 0.7, (per_img, 2))
        labels.append(np.concatenate([np.zeros((per_img, 1)), xy, wh], 1).astype(np.float32))
    return SimpleNamespace(shapes=np.tile([w, h], (n_img, 1)).astype(np.float64), labels=labels)


def bpr_of(pixel_anchors: torch.Tensor, dataset, thr: float = 4.0) -> float:
    shapes = 640 * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    wh = torch.tensor(np.concatenate([lb[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)])).float()
    r = wh[:, None] / pixel_anchors.view(-1, 2)[None]
    best = torch.min(r, 1 / r).min(2)[0].max(1)[0]
    return float((best > 1 / thr).float().mean())


def test_check_anchor_order_flips_reversed():
    m = FakeDetect(V5_ANCHORS[::-1].copy())  # large anchors on the small stride
    before = m.anchors.clone()
    check_anchor_order(m)
    torch.testing.assert_close(m.anchors, before.flip(0))
    check_anchor_order(m)  # already in order: unchanged
    torch.testing.assert_close(m.anchors, before.flip(0))


def test_good_anchors_kept():
    data = make_dataset(0)
    model = FakeModel(V5_ANCHORS)
    before = model.model[-1].anchors.clone()
    assert check_anchors(data, model, thr=4.0, imgsz=640, gen=50, seed=0) is False
    torch.testing.assert_close(model.model[-1].anchors, before)


def test_bad_anchors_replaced_and_bpr_improves():
    data = make_dataset(1)
    tiny = (np.full((9, 2), 0.5) * np.arange(1, 10)[:, None]).astype(np.float32)  # 0.5 .. 4.5 px
    model = FakeModel(tiny)
    m = model.model[-1]
    old_bpr = bpr_of(m.anchors * STRIDES.view(-1, 1, 1), data)
    assert old_bpr < 0.5
    assert check_anchors(data, model, thr=4.0, imgsz=640, gen=200, seed=0) is True
    pixels = m.anchors * STRIDES.view(-1, 1, 1)
    assert bpr_of(pixels, data) > max(old_bpr, 0.9)
    areas = pixels.view(-1, 2).prod(1)
    assert torch.all(areas[1:] >= areas[:-1])  # small anchors stay on the small stride
    assert m.anchors.dtype == torch.float32 and m.anchors.shape == (3, 3, 2)


def test_kmean_anchors_sorted_and_deterministic():
    data = make_dataset(2)
    a = kmean_anchors(data, n=9, img_size=640, thr=4.0, gen=100, verbose=False, seed=3)
    b = kmean_anchors(data, n=9, img_size=640, thr=4.0, gen=100, verbose=False, seed=3)
    assert a.shape == (9, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    area = a.prod(1)
    assert np.all(area[1:] >= area[:-1])
    assert np.all(a >= 2.0)
    assert bpr_of(torch.tensor(a), data) > 0.98


def test_kmean_anchors_seed_leaves_global_state():
    data = make_dataset(3, n_img=10)
    np.random.seed(5)
    random.seed(5)
    expected = (np.random.rand(), random.random())
    np.random.seed(5)
    random.seed(5)
    kmean_anchors(data, n=6, gen=30, verbose=False, seed=1)
    assert (np.random.rand(), random.random()) == expected


def test_kmean_anchors_global_rng_reproducible():
    data = make_dataset(4, n_img=10)
    out = []
    for _ in range(2):
        np.random.seed(0)
        random.seed(0)
        out.append(kmean_anchors(data, n=6, gen=40, verbose=True))
    np.testing.assert_array_equal(out[0], out[1])


def test_kmean_anchors_falls_back_to_random_init(caplog):
    data = SimpleNamespace(shapes=np.array([[640.0, 640.0]]),
                           labels=[np.array([[0, 0.5, 0.5, 0.1, 0.2], [0, 0.5, 0.5, 0.2, 0.1]], np.float32)])
    with caplog.at_level("WARNING", logger="utils.train.autoanchor"):
        k = kmean_anchors(data, n=9, gen=20, verbose=False, seed=0)  # 9 anchors, only 2 boxes
    assert "random init" in caplog.text
    assert k.shape == (9, 2)


def test_kmean_anchors_warns_small_objects(caplog):
    data = make_dataset(5, n_img=5)
    data.labels[0][:, 3:5] = 1.0 / 640  # 1-pixel boxes: warned about and filtered out
    with caplog.at_level("WARNING", logger="utils.train.autoanchor"):
        k = kmean_anchors(data, n=9, gen=20, verbose=False, seed=0)
    assert "Extremely small objects" in caplog.text
    assert k.shape == (9, 2)


def test_kmean_anchors_from_yaml(coco128_yaml):
    k = kmean_anchors(str(coco128_yaml), n=9, img_size=640, gen=30, verbose=False, seed=0)
    assert k.shape == (9, 2)
    assert np.all(k.prod(1)[1:] >= k.prod(1)[:-1])
