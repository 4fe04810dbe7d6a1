"""Image loading and letterboxing, pixel-for-pixel as YOLOv5 v7.0 does them.

Validation numbers depend on these details: the first resize uses INTER_AREA when shrinking
(INTER_LINEAR when enlarging or augmenting) with ``ceil`` rounding of the new size, and the
letterbox pads with grey 114 split as ``round(d - 0.1)`` / ``round(d + 0.1)`` on each side.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np


def resize_longest(im: np.ndarray, img_size: int, augment: bool = False) -> np.ndarray:
    """Resize so the longest side is ``img_size`` (no-op if it already is), keeping aspect ratio."""
    h0, w0 = im.shape[:2]
    r = img_size / max(h0, w0)
    if r != 1:
        # shrinking with INTER_AREA avoids aliasing; enlarging (or augmenting) uses INTER_LINEAR
        interp = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
        im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
    return im


def read_image(path: str | Path) -> np.ndarray:
    """Read a BGR uint8 image with OpenCV (EXIF orientation applied by OpenCV's default)."""
    im = cv2.imread(str(path))
    if im is None:
        raise FileNotFoundError(f"{path}: image not found or not decodable by OpenCV")
    return im


def load_image(path: str | Path, img_size: int, augment: bool = False
               ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Read an image and resize its longest side to ``img_size``.

    Returns ``(image BGR uint8, (h0, w0) original, (h, w) resized)``.

    Example:
        >>> im, (h0, w0), (h, w) = load_image("bus.jpg", 640)  # doctest: +SKIP
        >>> (h0, w0), (h, w)  # doctest: +SKIP
        ((1080, 810), (640, 480))
    """
    im = read_image(path)
    h0, w0 = im.shape[:2]
    im = resize_longest(im, img_size, augment)
    return im, (h0, w0), im.shape[:2]


def letterbox(im: np.ndarray, new_shape: int | tuple[int, int] | np.ndarray = (640, 640),
              color: tuple[int, int, int] = (114, 114, 114), auto: bool = True, scaleFill: bool = False,
              scaleup: bool = True, stride: int = 32
              ) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize and pad an image to ``new_shape`` (height, width) keeping its aspect ratio.

    ``auto`` pads only up to the next multiple of ``stride`` (minimum rectangle);
    ``scaleFill`` stretches without padding; ``scaleup=False`` never enlarges (better val mAP).
    Returns ``(image, (ratio_w, ratio_h), (pad_w, pad_h))`` where the pads are per side (halves).

    Example:
        >>> im, ratio, (dw, dh) = letterbox(np.zeros((480, 640, 3), np.uint8), 640, auto=False)
        >>> im.shape, ratio, (dw, dh)
        ((640, 640, 3), (1.0, 1.0), (0.0, 80.0))
    """
    shape = im.shape[:2]  # height, width
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    ratio = r, r
    new_unpad = int(round(shape[1] * r)), int(round(shape[0] * r))
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    elif scaleFill:
        dw, dh = 0.0, 0.0
        new_unpad = (new_shape[1], new_shape[0])
        ratio = new_shape[1] / shape[1], new_shape[0] / shape[0]
    dw /= 2
    dh /= 2
    if shape[::-1] != new_unpad:
        im = cv2.resize(im, new_unpad, interpolation=cv2.INTER_LINEAR)
    # the +-0.1 puts an odd pixel of padding on the bottom/right, as upstream
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (dw, dh)
