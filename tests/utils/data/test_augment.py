"""Tests for utils/data/augment.py: affine warp, mosaic, HSV, flips and mixup on tiny synthetic images."""
from __future__ import annotations

import random

import numpy as np
import pytest

from utils.data.augment import (
    augment_hsv,
    box_candidates,
    choose_mosaic,
    load_mosaic,
    mixup,
    random_flip,
    random_perspective,
)

NO_WARP = dict(degrees=0, translate=0, scale=0, shear=0, perspective=0)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0),
           (255, 0, 255), (0, 255, 255), (40, 40, 40), (200, 100, 0)]
SHIFT_ONLY = dict(degrees=0, scale=0, shear=0)


class FixedRng:
    """Stands in for ``random``: uniform() returns the queued values in order."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, a, b):
        value = self.values.pop(0)
        assert a <= value <= b, (a, value, b)
        return value


def _canvas(h=64, w=80):
    return np.full((h, w, 3), 114, np.uint8)


def test_identity_keeps_image_and_boxes():
    im = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    targets = np.array([[0, 5, 6, 30, 40], [3, 40, 10, 60, 20]], np.float32)
    out, t = random_perspective(im.copy(), targets.copy(), rng=random.Random(1), **NO_WARP)
    assert np.array_equal(out, im)
    np.testing.assert_allclose(t, targets)


def test_translation_moves_boxes_and_pixels():
    im = _canvas()
    im[10:30, 20:40] = (0, 0, 255)
    targets = np.array([[1, 20, 10, 40, 30]], np.float32)
    # perspective x2, angle, zoom, shear x2, then translation as a fraction of the output size
    rng = FixedRng([0, 0, 0, 1, 0, 0, 0.6, 0.45])
    out, t = random_perspective(im, targets.copy(), degrees=0, translate=0.2, scale=0, shear=0, rng=rng)
    dx, dy = 0.1 * 80, -0.05 * 64
    np.testing.assert_allclose(t[0, 1:], [20 + dx, 10 + dy, 40 + dx, 30 + dy], atol=1e-4)
    assert t[0, 0] == 1
    assert tuple(out[int(10 + dy) + 2, int(20 + dx) + 2]) == (0, 0, 255)
    assert tuple(out[12, 22]) == (114, 114, 114)  # the old place is background now


def test_boxes_pushed_out_are_dropped_and_partial_ones_clipped():
    targets = np.array([[0, 60, 10, 78, 30], [1, 10, 10, 30, 30], [2, 40, 40, 50, 50]], np.float32)
    rng = FixedRng([0, 0, 0, 1, 0, 0, 0.5 + 0.3, 0.5])  # shift right by 24 px of 80
    _, t = random_perspective(_canvas(), targets.copy(), degrees=0, translate=0.3, scale=0, shear=0, rng=rng)
    assert t[:, 0].tolist() == [1, 2]  # class 0 left the image entirely
    np.testing.assert_allclose(t[1, 1:], [64, 40, 74, 50], atol=1e-4)
    # a box only partly inside is clipped to the border and kept while enough of it remains
    rng = FixedRng([0, 0, 0, 1, 0, 0, 0.5 + 0.1, 0.5])  # shift right by 8 px
    _, t = random_perspective(_canvas(), targets[:1].copy(), translate=0.1, rng=rng, **SHIFT_ONLY)
    np.testing.assert_allclose(t[0, 1:], [68, 10, 80, 30], atol=1e-4)


def test_box_candidates_rules():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 300, 300]], float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 3, 3], [0, 0, 300, 2.5]], float).T
    assert box_candidates(before, after).tolist() == [True, False, False, False]
    assert box_candidates(before, after, wh_thr=1, area_thr=0.0, ar_thr=1000).all()


def test_segments_rebuild_boxes():
    im = _canvas()
    targets = np.array([[0, 10, 10, 50, 50]], np.float32)
    triangle = np.array([[10, 50], [50, 50], [30, 10]], float)
    _, t = random_perspective(im, targets.copy(), [triangle], rng=random.Random(0), **NO_WARP)
    np.testing.assert_allclose(t[0, 1:], [10, 10, 50, 50], atol=0.05)
    rng = FixedRng([0, 0, 0, 1, 0, 0, 0.6, 0.5])  # shift 8 px right
    _, t = random_perspective(im, targets.copy(), [triangle], translate=0.1, rng=rng, **SHIFT_ONLY)
    np.testing.assert_allclose(t[0, 1:], [18, 10, 58, 50], atol=0.05)


def _mosaic_sources(s: int, seed: int):
    """Four images (long side s) with solid rectangles; labels normalised xywh, class = colour id."""
    gen = np.random.default_rng(seed)
    images, labels = {}, {}
    shapes = [(s, s), (s, s * 3 // 4), (s // 2, s), (s * 3 // 4, s // 2)]
    for idx, (h, w) in enumerate(shapes):
        im = np.full((h, w, 3), 114, np.uint8)
        rows = []
        for k in range(2):  # two rectangles side by side so they never overlap
            cls = 2 * idx + k
            x1 = int(gen.integers(k * w // 2, k * w // 2 + w // 8))
            y1 = int(gen.integers(0, h // 3))
            x2 = min(x1 + w // 3, (k + 1) * w // 2)
            y2 = min(y1 + h // 2, h)
            im[y1:y2, x1:x2] = COLOURS[cls]
            rows.append([cls, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
        images[idx + 10] = im
        labels[idx + 10] = np.array(rows, np.float32)
    return images, labels


def test_mosaic_places_tiles_exactly_without_warp():
    s = 64
    images, labels = _mosaic_sources(s, 0)
    load = lambda i: (images[i], images[i].shape[:2], images[i].shape[:2])  # noqa: E731
    im, lb = load_mosaic(load, [10, 11, 12, 13], labels, s, NO_WARP, rng=random.Random(0), center=(s, s))
    assert im.shape == (s, s, 3) and im.dtype == np.uint8
    # with no warp the output is the middle s x s crop of the 2s canvas: offset -s/2
    half = s // 2
    assert np.array_equal(im[:half, :half], images[10][s - half:, s - half:])
    assert np.array_equal(im[:half, half:], images[11][s - half:, :half])
    h2, w2 = images[12].shape[:2]
    assert np.array_equal(im[half:half + h2, :half], images[12][:, w2 - half:])
    # expected labels: tile offsets in the 2s canvas, then the -s/2 crop, clip, and the size filter
    pads = {10: (0, 0), 11: (s, 0), 12: (0, s), 13: (s, s)}
    expected = []
    for idx, (padw, padh) in pads.items():
        ih, iw = images[idx].shape[:2]
        for cls, x, y, w, h in labels[idx]:
            box = np.array([(x - w / 2) * iw + padw, (y - h / 2) * ih + padh, (x + w / 2) * iw + padw,
                            (y + h / 2) * ih + padh]) - half
            box = np.clip(box, 0, s)
            if (box[2:] - box[:2] > 2).all():
                expected.append([cls, *box])
    expected = np.array(expected)
    assert len(expected) >= 3
    np.testing.assert_allclose(lb[np.argsort(lb[:, 0])], expected[np.argsort(expected[:, 0])], atol=1e-3)
    assert labels[10].shape == (2, 5) and labels[10].max() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mosaic_labels_cover_drawn_objects(seed):
    s = 96
    images, labels = _mosaic_sources(s, seed)
    labels_before = {k: v.copy() for k, v in labels.items()}
    load = lambda i: (images[i], images[i].shape[:2], images[i].shape[:2])  # noqa: E731
    hyp = dict(degrees=5, translate=0.1, scale=0.3, shear=0, perspective=0)
    rng = random.Random(seed)
    indices, centre = choose_mosaic(10, [10, 11, 12, 13], s, rng)
    im, lb = load_mosaic(load, indices, labels, s, hyp, rng=rng, center=centre)
    assert im.shape == (s, s, 3)
    assert len(lb) > 0 and lb.shape[1] == 5
    assert (lb[:, 1:] >= 0).all() and (lb[:, [1, 3]] <= s).all() and (lb[:, [2, 4]] <= s).all()
    checked = 0
    for cls, x1, y1, x2, y2 in lb:
        if min(x2 - x1, y2 - y1) < 8:
            continue  # thin slivers cut at the mosaic seams may be blurred by interpolation
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        pixel = im[cy, cx].astype(int)
        assert np.abs(pixel - COLOURS[int(cls)]).max() <= 40, (cls, pixel)
        checked += 1
    assert checked > 0
    for k in labels:
        assert np.array_equal(labels[k], labels_before[k])


def test_choose_mosaic_centre_range_and_reproducible():
    s = 64
    for seed in range(20):
        indices, (yc, xc) = choose_mosaic(5, range(10), s, random.Random(seed))
        assert len(indices) == 4 and 5 in indices
        assert s // 2 <= yc <= 3 * s // 2 and s // 2 <= xc <= 3 * s // 2
    first, again = (choose_mosaic(5, range(10), s, random.Random(3)) for _ in range(2))
    assert first == again


def test_load_mosaic_rejects_wrong_index_count():
    with pytest.raises(ValueError, match="4 indices"):
        load_mosaic(lambda i: None, [0, 1], {}, 64, NO_WARP)


def test_hsv_keeps_dtype_shape_and_changes_values():
    im = np.random.default_rng(0).integers(30, 220, (32, 40, 3), dtype=np.uint8)
    out = im.copy()
    augment_hsv(out, 0.015, 0.7, 0.4, np_rng=np.random.default_rng(3))
    assert out.dtype == np.uint8 and out.shape == im.shape
    assert np.abs(out.astype(int) - im).mean() > 1.0
    untouched = im.copy()
    augment_hsv(untouched, 0, 0, 0)
    assert np.array_equal(untouched, im)


def test_flips_mirror_image_and_labels():
    im = np.zeros((20, 30, 3), np.uint8)
    im[2:6, 3:9] = 255
    labels = np.array([[0, 0.2, 0.2, 0.2, 0.2], [1, 0.7, 0.9, 0.1, 0.1]], np.float32)
    out, lb = random_flip(im, labels.copy(), fliplr=1.0, flipud=0.0, rng=random.Random(0))
    np.testing.assert_allclose(lb[:, 1], 1 - labels[:, 1])
    np.testing.assert_allclose(lb[:, 2:], labels[:, 2:])
    assert np.array_equal(out, im[:, ::-1])
    out, lb = random_flip(im, labels.copy(), fliplr=0.0, flipud=1.0, rng=random.Random(0))
    np.testing.assert_allclose(lb[:, 2], 1 - labels[:, 2])
    np.testing.assert_allclose(lb[:, [1, 3, 4]], labels[:, [1, 3, 4]])
    assert np.array_equal(out, im[::-1])
    out, lb = random_flip(im, labels.copy(), fliplr=0.0, flipud=0.0)
    assert np.array_equal(out, im) and np.array_equal(lb, labels)


def test_mixup_blends_and_concatenates():
    a = np.full((8, 8, 3), 200, np.uint8)
    b = np.full((8, 8, 3), 100, np.uint8)
    la, lb = np.ones((2, 5), np.float32), np.zeros((3, 5), np.float32)
    im, labels = mixup(a, la, b, lb, np_rng=np.random.default_rng(0))
    assert im.dtype == np.uint8 and labels.shape == (5, 5)
    assert 120 < im[0, 0, 0] < 180  # Beta(32, 32) stays near 0.5
