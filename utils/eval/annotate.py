"""Drawing detections on images with OpenCV only (Hershey fonts: nothing to download).

Example:
    >>> im = draw_detections(cv2.imread("bus.jpg"), pred.boxes, {0: "person", 5: "bus"})  # doctest: +SKIP
    >>> pair = side_by_side(im, im2, ("yolov5n.pt", "yolov5n.onnx"))  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from utils.boxes import clip_boxes, xywh2xyxy, xyxy2xywh
from utils.eval.plots import class_color
from utils.paths import increment_path

__all__ = ["box_label", "default_line_width", "draw_detections", "save_crop", "side_by_side"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def default_line_width(image: np.ndarray) -> int:
    """Upstream's default box thickness: about 0.3% of the mean image side, at least 2 px."""
    return max(round(sum(image.shape[:2]) / 2 * 0.003), 2)


def box_label(image: np.ndarray, xyxy: Sequence[float], label: str, color: tuple, lw: int) -> None:
    """Draw one box and, when ``label`` is not empty, its filled caption (inside the box at the top edge)."""
    p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
    cv2.rectangle(image, p1, p2, color, thickness=lw, lineType=cv2.LINE_AA)
    if not label:
        return
    thick = max(lw - 1, 1)
    scale = lw / 3
    tw, th = cv2.getTextSize(label, _FONT, scale, thick)[0]
    outside = p1[1] - th - 3 >= 0
    top = (p1[0], p1[1] - th - 3) if outside else (p1[0], p1[1])
    bottom = (p1[0] + tw, p1[1]) if outside else (p1[0] + tw, p1[1] + th + 3)
    cv2.rectangle(image, top, bottom, color, -1, cv2.LINE_AA)
    text_color = (0, 0, 0) if sum(color) > 500 else (255, 255, 255)  # dark text on light boxes
    cv2.putText(image, label, (top[0], bottom[1] - 2), _FONT, scale, text_color, thick, cv2.LINE_AA)


def draw_detections(image: np.ndarray, boxes: torch.Tensor, names: dict, line_width: Optional[int] = None,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw (n, 6) [x1, y1, x2, y2, conf, cls] detections on ``image`` (BGR, modified in place)."""
    lw = line_width or default_line_width(image)
    for *xyxy, conf, cls in reversed(boxes.tolist()):
        c = int(cls)
        name = names.get(c, str(c))
        label = "" if hide_labels else (name if hide_conf else f"{name} {conf:.2f}")
        box_label(image, xyxy, label, class_color(c, bgr=True), lw)
    return image


def save_crop(xyxy: Sequence[float], image: np.ndarray, file: Path, gain: float = 1.02, pad: int = 10) -> Path:
    """Save a box's region of ``image`` (grown by ``gain`` and ``pad`` pixels) to a free name near ``file``."""
    b = xyxy2xywh(torch.tensor(xyxy, dtype=torch.float32).view(-1, 4))
    b[:, 2:] = b[:, 2:] * gain + pad
    box = xywh2xyxy(b).long()
    clip_boxes(box, image.shape[:2])
    x1, y1, x2, y2 = box[0].tolist()
    file = increment_path(file).with_suffix(".jpg")
    file.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(file), image[y1:y2, x1:x2], [cv2.IMWRITE_JPEG_QUALITY, 95]):
        raise OSError(f"{file}: could not write the crop")
    return file


def _title(image: np.ndarray, text: str) -> np.ndarray:
    """A white band with ``text`` above ``image``."""
    scale = max(image.shape[1] / 900, 0.5)
    thick = max(round(scale * 2), 1)
    (_, th), base = cv2.getTextSize("Ag", _FONT, scale, thick)  # one band height for any text
    band = np.full((th + base + 12, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (6, th + 6), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return np.concatenate((band, image), 0)


def side_by_side(left: np.ndarray, right: np.ndarray, titles: Sequence[str] = ("", ""), gap: int = 8) -> np.ndarray:
    """Two images of the same size next to each other, each under its title, with a white gap."""
    left, right = (_title(im, t) if t else im for im, t in zip((left, right), titles))
    spacer = np.full((left.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate((left, spacer, right), 1)
