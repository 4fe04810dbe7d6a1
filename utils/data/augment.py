"""Training-time image augmentations of YOLOv5 v7.0: HSV jitter, random affine/perspective, mosaic,
mixup and flips. Pure functions on numpy images (HWC, BGR, uint8) and numpy label arrays.

Randomness: functions that draw numbers take ``rng`` (anything with the ``random.Random``
methods ``uniform``, ``random``, ``choices``, ``shuffle``) and/or ``np_rng`` (a
``numpy.random.Generator`` or ``RandomState``). ``None`` means the process-wide ``random`` and
``numpy.random`` modules, which is what upstream uses, so seeding those reproduces its stream.
The draws happen in the same order as upstream.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np

from utils.boxes import xyn2xy, xywhn2xyxy

logger = logging.getLogger(__name__)

PAD_VALUE = 114  # grey used for everything outside the source image

LoadFn = Callable[[int], tuple[np.ndarray, tuple[int, int], tuple[int, int]]]


def augment_hsv(
    im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5, np_rng: Any = None
) -> None:
    """Randomly scale hue, saturation and value of a BGR uint8 image, in place.

    Each channel is multiplied by a factor drawn from [1 - gain, 1 + gain]; hue wraps at 180
    (OpenCV's 8-bit hue range), saturation and value saturate at 255.
    """
    if not (hgain or sgain or vgain):
        return
    np_rng = np.random if np_rng is None else np_rng
    gains = np_rng.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=gains.dtype)
    lut_hue = ((x * gains[0]) % 180).astype(im.dtype)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(im.dtype)
    lut_val = np.clip(x * gains[2], 0, 255).astype(im.dtype)
    im_hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(im_hsv, cv2.COLOR_HSV2BGR, dst=im)


def box_candidates(
    box1: np.ndarray, box2: np.ndarray, wh_thr: float = 2, ar_thr: float = 100, area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Mask of boxes worth keeping after augmentation.

    ``box1`` (before, scaled by the augmentation's zoom) and ``box2`` (after) are (4, n) xyxy.
    A box survives if it is wider and taller than ``wh_thr`` pixels, keeps more than ``area_thr``
    of its area and has an aspect ratio below ``ar_thr``.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    ratio = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (ratio < ar_thr)


def _affine_matrix(
    im_shape: tuple[int, ...], out_wh: tuple[int, int], degrees: float, translate: float, scale: float,
    shear: float, perspective: float, rng: Any,
) -> tuple[np.ndarray, float]:
    """Compose the 3x3 warp (and return the zoom factor); draw order matches upstream."""
    width, height = out_wh
    centre = np.eye(3)  # move the image centre to the origin so rotation/scale act about it
    centre[0, 2] = -im_shape[1] / 2
    centre[1, 2] = -im_shape[0] / 2

    persp = np.eye(3)
    persp[2, 0] = rng.uniform(-perspective, perspective)
    persp[2, 1] = rng.uniform(-perspective, perspective)

    rot = np.eye(3)
    angle = rng.uniform(-degrees, degrees)
    zoom = rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=zoom)

    shr = np.eye(3)
    shr[0, 1] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)
    shr[1, 0] = math.tan(rng.uniform(-shear, shear) * math.pi / 180)

    trans = np.eye(3)  # back from the origin to a point near the output centre
    trans[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * width
    trans[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * height
    return trans @ shr @ rot @ persp @ centre, zoom


def _warp_boxes(boxes: np.ndarray, m: np.ndarray, perspective: bool, width: int, height: int) -> np.ndarray:
    """Warp (n, 4) xyxy boxes by their 4 corners; return the clipped enclosing boxes."""
    n = len(boxes)
    xy = np.ones((n * 4, 3))
    xy[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    xy = xy @ m.T
    xy = (xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]).reshape(n, 8)
    x, y = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
    new = np.stack((x.min(1), y.min(1), x.max(1), y.max(1)), 1)
    new[:, [0, 2]] = new[:, [0, 2]].clip(0, width)
    new[:, [1, 3]] = new[:, [1, 3]].clip(0, height)
    return new


def resample_segments(segments: Sequence[np.ndarray], n: int = 1000) -> list[np.ndarray]:
    """Resample each closed polygon (k, 2) to ``n`` points evenly spaced along its vertex index."""
    out = []
    for seg in segments:
        closed = np.concatenate((seg, seg[:1]), 0)
        at = np.linspace(0, len(closed) - 1, n)
        idx = np.arange(len(closed))
        out.append(np.stack([np.interp(at, idx, closed[:, k]) for k in range(2)], 1))
    return out


def _segments_to_boxes(
    segments: Sequence[np.ndarray], m: np.ndarray, perspective: bool, width: int, height: int
) -> np.ndarray:
    """Warp polygons and return the boxes of their parts that stay inside the image."""
    new = np.zeros((len(segments), 4))
    for i, seg in enumerate(segments):
        xy = np.ones((len(seg), 3))
        xy[:, :2] = seg
        xy = xy @ m.T
        xy = xy[:, :2] / xy[:, 2:3] if perspective else xy[:, :2]
        inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] <= width) & (xy[:, 1] <= height)
        px, py = xy[inside, 0], xy[inside, 1]
        if len(px):
            new[i] = px.min(), py.min(), px.max(), py.max()
    return new


def _polygon_mask(segments: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Which of ``n`` targets have a polygon: none when ``segments`` is empty or all zeros, else the
    non-empty entries (a mixed dataset gives targets without one an empty (0, 2) array)."""
    if len(segments) == 0 or not any(np.asarray(s).any() for s in segments):
        return np.zeros(n, dtype=bool)
    if len(segments) != n:
        raise ValueError(f"random_perspective: {len(segments)} polygons for {n} targets; give one per target "
                         "(an empty (0, 2) array for a target without a polygon)")
    return np.array([len(s) > 0 for s in segments], dtype=bool)


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray | Sequence = (),
    segments: Sequence[np.ndarray] = (),
    degrees: float = 10,
    translate: float = 0.1,
    scale: float = 0.1,
    shear: float = 10,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
    rng: Any = None,
) -> tuple[np.ndarray, np.ndarray | Sequence]:
    """Random rotation, zoom, shear, translation and perspective of an image and its boxes.

    Args:
        im: HWC uint8 image.
        targets: (n, 5) [cls, x1, y1, x2, y2] in pixels.
        segments: optional polygons (one (k, 2) pixel array per target); when given, boxes are
            rebuilt from the warped polygons, resampled to 1000 points (tighter than warping the
            box corners). A target whose array is empty (0, 2) gets its box corners warped.
        degrees, translate, scale, shear, perspective: ranges of the random parameters.
        border: (y, x) pixels added on each side of the output (negative crops, as mosaic does).
        rng: python-random-like source; None uses the ``random`` module.

    Returns:
        The warped image of size (h + 2*border[0], w + 2*border[1]) and the surviving targets.
    """
    rng = random if rng is None else rng
    height = im.shape[0] + border[0] * 2
    width = im.shape[1] + border[1] * 2
    m, zoom = _affine_matrix(im.shape, (width, height), degrees, translate, scale, shear, perspective, rng)
    if border[0] != 0 or border[1] != 0 or (m != np.eye(3)).any():
        pad = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
        if perspective:
            im = cv2.warpPerspective(im, m, dsize=(width, height), borderValue=pad)
        else:
            im = cv2.warpAffine(im, m[:2], dsize=(width, height), borderValue=pad)

    n = len(targets)
    if n:
        has_polygon = _polygon_mask(segments, n)
        new = np.zeros((n, 4))
        if not has_polygon.all():  # box rows: warp the box corners
            new[~has_polygon] = _warp_boxes(targets[~has_polygon, 1:5], m, bool(perspective), width, height)
        if has_polygon.any():
            polygons = resample_segments([segments[i] for i in np.flatnonzero(has_polygon)])
            new[has_polygon] = _segments_to_boxes(polygons, m, bool(perspective), width, height)
        area_thr = np.where(has_polygon, 0.01, 0.10)  # polygon boxes are tighter: keep smaller remainders
        keep = box_candidates(box1=targets[:, 1:5].T * zoom, box2=new.T, area_thr=area_thr)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def mixup(
    im: np.ndarray, labels: np.ndarray, im2: np.ndarray, labels2: np.ndarray, np_rng: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a ratio r ~ Beta(32, 32) and concatenate their labels."""
    np_rng = np.random if np_rng is None else np_rng
    r = np_rng.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)


def random_flip(
    im: np.ndarray, labels: np.ndarray, fliplr: float = 0.5, flipud: float = 0.0, rng: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flip up-down with probability ``flipud``, then left-right with probability ``fliplr``.

    ``labels`` are (n, 5) [cls, x, y, w, h] normalised; they are updated in place and returned.
    Both draws always happen (up-down first), as upstream, so the random stream does not depend
    on the probabilities.
    """
    rng = random if rng is None else rng
    # cv2.flip returns a contiguous copy at memcpy speed; a numpy flipped view would make every later
    # copy of the image walk backwards over 3-byte pixels (about 40x slower for a 640x640 image)
    if rng.random() < flipud:
        im = cv2.flip(im, 0)
        if len(labels):
            labels[:, 2] = 1 - labels[:, 2]
    if rng.random() < fliplr:
        im = cv2.flip(im, 1)
        if len(labels):
            labels[:, 1] = 1 - labels[:, 1]
    return im, labels


def mosaic_border(img_size: int) -> tuple[int, int]:
    """(y, x) border random_perspective uses to crop a 2s mosaic back to s (upstream: -s // 2)."""
    return -img_size // 2, -img_size // 2


def choose_mosaic(
    index: int, pool: Sequence[int], img_size: int, rng: Any = None
) -> tuple[list[int], tuple[int, int]]:
    """Draw the mosaic centre (yc, xc) and the 4 image indices (``index`` plus 3 from ``pool``).

    The draws (centre y, centre x, three choices, shuffle) follow upstream's order, so a dataset
    that calls this and then ``load_mosaic(..., center=...)`` reproduces upstream's stream.
    """
    rng = random if rng is None else rng
    yc, xc = (int(rng.uniform(-b, 2 * img_size + b)) for b in mosaic_border(img_size))
    indices = [index] + rng.choices(pool, k=3)
    rng.shuffle(indices)
    return indices, (yc, xc)


def _place(i: int, xc: int, yc: int, w: int, h: int, s: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Destination (x1a, y1a, x2a, y2a) in the 2s canvas and source crop (x1b, y1b, x2b, y2b).

    Tile 0 ends at the centre from the top-left, 1 from the top-right, 2 bottom-left, 3 bottom-right.
    """
    if i == 0:
        a = (max(xc - w, 0), max(yc - h, 0), xc, yc)
        b = (w - (a[2] - a[0]), h - (a[3] - a[1]), w, h)
    elif i == 1:
        a = (xc, max(yc - h, 0), min(xc + w, s * 2), yc)
        b = (0, h - (a[3] - a[1]), min(w, a[2] - a[0]), h)
    elif i == 2:
        a = (max(xc - w, 0), yc, xc, min(s * 2, yc + h))
        b = (w - (a[2] - a[0]), 0, w, min(a[3] - a[1], h))
    else:
        a = (xc, yc, min(xc + w, s * 2), min(s * 2, yc + h))
        b = (0, 0, min(w, a[2] - a[0]), min(a[3] - a[1], h))
    return a, b


def _pixel_polygons(polygons: Sequence[np.ndarray], n: int, w: int, h: int, padw: int, padh: int) -> list:
    """One image's polygons in mosaic pixels, one per label; an image whose labels are box rows (no
    polygons, as in a dataset mixing both formats) gets an empty (0, 2) array per label."""
    if len(polygons) != n:
        return [np.zeros((0, 2), dtype=np.float32) for _ in range(n)]
    return [xyn2xy(np.array(p, dtype=np.float32), w, h, padw, padh) for p in polygons]


def load_mosaic(
    load_fn: LoadFn,
    indices: Sequence[int],
    labels: Sequence[np.ndarray] | Mapping[int, np.ndarray],
    img_size: int,
    hyp: Mapping[str, float],
    rng: Any = None,
    center: tuple[int, int] | None = None,
    segments: Sequence[Sequence[np.ndarray]] | Mapping[int, Sequence[np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Build a 4-image mosaic and randomly warp it back to ``img_size`` x ``img_size``.

    Args:
        load_fn: ``load_fn(index) -> (im, (h0, w0), (h, w))``, the image resized so its long side
            is ``img_size`` (utils.data.images.load_image semantics).
        indices: the 4 dataset indices, placed top-left, top-right, bottom-left, bottom-right.
        labels: indexable by dataset index (e.g. the dataset's label list): (n, 5) [cls, x, y, w, h]
            normalised to the image.
        img_size: s; the canvas is 2s x 2s and the result s x s.
        hyp: degrees, translate, scale, shear, perspective.
        rng: python-random-like source; None uses the ``random`` module.
        center: (yc, xc) in the 2s canvas; drawn uniformly in [s/2, 3s/2] when None.
        segments: optional, indexable like ``labels``: per image a list of (k, 2) normalised
            polygons, one per label; the final boxes are then rebuilt from the warped polygons.

    Returns:
        The s x s image and (n, 5) [cls, x1, y1, x2, y2] pixel labels.

    Example:
        >>> idx, c = choose_mosaic(i, range(len(ds)), 640)
        >>> im, lb = load_mosaic(ds.load_image, idx, ds.labels, 640, hyp, center=c)
    """
    if len(indices) != 4:
        raise ValueError(f"load_mosaic: need 4 indices, got {list(indices)}")
    rng = random if rng is None else rng
    s = img_size
    border = mosaic_border(s)
    if center is None:
        yc, xc = (int(rng.uniform(-b, 2 * s + b)) for b in border)
    else:
        yc, xc = center

    canvas = None
    all_labels, all_segments = [], []
    for i, index in enumerate(indices):
        img, _, (h, w) = load_fn(index)
        if canvas is None:
            canvas = np.full((s * 2, s * 2, img.shape[2]), PAD_VALUE, dtype=np.uint8)
        (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = _place(i, xc, yc, w, h, s)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        lb = np.array(labels[index], dtype=np.float32).reshape(-1, 5)  # copy: never touch the cache
        padw, padh = x1a - x1b, y1a - y1b
        if lb.size:
            lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, padw, padh)
        if segments is not None:
            all_segments += _pixel_polygons(segments[index], len(lb), w, h, padw, padh)
        all_labels.append(lb)

    merged = np.concatenate(all_labels, 0)
    for x in (merged[:, 1:], *all_segments):
        np.clip(x, 0, 2 * s, out=x)
    return random_perspective(
        canvas, merged, all_segments,
        degrees=hyp["degrees"], translate=hyp["translate"], scale=hyp["scale"],
        shear=hyp["shear"], perspective=hyp["perspective"], border=border, rng=rng,
    )
