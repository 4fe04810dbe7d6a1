"""Single-image inference: predict boxes on one image exactly as val.py predicts them.

A :class:`Detector` letterboxes an image as val.py's dataloader does for a batch of one, runs the
model and applies val.py's NMS (every class above the threshold kept, ``multi_label``), so its boxes
are exactly val.py's predictions at the same thresholds.

Example:
    >>> det = Detector(model, "yolov5n.pt", torch.device("cpu"), 320, names)  # doctest: +SKIP
    >>> pred = det.predict(cv2.imread("bus.jpg"))  # doctest: +SKIP
    >>> pred.boxes[:, :4]  # x1 y1 x2 y2 in image pixels  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from utils.boxes import scale_boxes
from utils.data.sources import letterbox_like_val
from utils.eval.nms import non_max_suppression
from utils.torch_utils import time_sync

__all__ = ["Detector", "NmsOptions", "Prediction"]


@dataclass(frozen=True)
class NmsOptions:
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    classes: Optional[Sequence[int]] = None
    agnostic: bool = False


@dataclass
class Prediction:
    """Detections (n, 6) [x1, y1, x2, y2, conf, cls] in original-image pixels, the input shape that
    ran (1, 3, h, w) and the pre-process, inference and NMS times in seconds."""

    boxes: torch.Tensor
    shape: tuple
    times: tuple = field(default=(0.0, 0.0, 0.0))


class Detector:
    """A loaded model (PyTorch, QAT or ONNX) with val.py's letterbox and NMS around it."""

    def __init__(self, model: Any, weights: str, device: torch.device, imgsz: int, names: dict,
                 rect: bool = True, half: bool = False) -> None:
        self.model, self.weights, self.device = model, weights, device
        self.imgsz, self.names, self.rect, self.half = imgsz, names, rect, half
        self.stride = max(int(model.stride.max()), 32)

    def predict(self, image: np.ndarray, options: NmsOptions = NmsOptions(), augment: bool = False) -> Prediction:
        """Boxes of one BGR uint8 image."""
        chw, ratio_pad = letterbox_like_val(image, self.imgsz, self.stride, rect=self.rect)
        t0 = time_sync()
        im = torch.from_numpy(chw).to(self.device)[None]
        im = (im.half() if self.half else im.float()) / 255
        t1 = time_sync()
        out = self.model(im, augment=True) if augment else self.model(im)
        preds = out[0] if isinstance(out, (tuple, list)) else out
        t2 = time_sync()
        det = non_max_suppression(preds, options.conf_thres, options.iou_thres, options.classes,
                                  options.agnostic, multi_label=True, max_det=options.max_det)[0]
        det = det.float()
        scale_boxes(im.shape[2:], det[:, :4], image.shape[:2], ratio_pad)
        t3 = time_sync()
        return Prediction(det, tuple(im.shape), (t1 - t0, t2 - t1, t3 - t2))
