"""Single-image inference for detect.py: load any weights val.py takes, predict boxes as val.py does.

A :class:`Detector` letterboxes an image as val.py's dataloader does for a batch of one, runs the
model and applies val.py's NMS (every class above the threshold kept, ``multi_label``), so its boxes
are exactly val.py's predictions at the same thresholds.

Example:
    >>> det = load_detector("yolov5n.pt", "cpu", imgsz=320)  # doctest: +SKIP
    >>> pred = det.predict(cv2.imread("bus.jpg"))  # doctest: +SKIP
    >>> pred.boxes[:, :4]  # x1 y1 x2 y2 in image pixels  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from utils.boxes import scale_boxes, xyxy2xywh
from utils.eval.nms import non_max_suppression
from utils.data.sources import letterbox_like_val
from utils.torch_utils import time_sync

__all__ = ["Detector", "NmsOptions", "Prediction", "label_rows", "load_detector"]

LOGGER = logging.getLogger(__name__)


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


def _names(model_names: Any, data: Optional[str | Path], nc: int) -> dict:
    """The model's class names; a dataset yaml's when the model carries none (e.g. bare ONNX files)."""
    names = dict(enumerate(model_names)) if isinstance(model_names, (list, tuple)) else dict(model_names or {})
    generic = not names or all(str(v) == str(k) for k, v in names.items())
    if generic and data and Path(data).is_file():
        import yaml  # only the names are needed: the dataset's image folders may not exist here

        try:
            listed = (yaml.safe_load(Path(data).read_text()) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as err:
            raise ValueError(f"{data}: unreadable dataset yaml ({err})") from None
        listed = dict(enumerate(listed)) if isinstance(listed, (list, tuple)) else dict(listed or {})
        if len(listed) == nc:
            return {int(k): str(v) for k, v in listed.items()}
    return names or {i: str(i) for i in range(nc)}


def load_detector(weights: str | Path, device: torch.device | str = "cpu", imgsz: int = 640,
                  half: bool = False, data: Optional[str | Path] = None, augment: bool = False) -> Detector:
    """Load an official or own .pt (float or QAT) or an exported .onnx file for inference.

    A static-shape ONNX file runs at its exported size on square letterboxed images, as val.py runs
    it; ``half`` applies to float PyTorch models on CUDA only. ``augment`` (test-time augmentation)
    is refused for models that cannot run it.
    """
    from utils.data.data_config import check_img_size
    from utils.qat import is_prepared, load_model

    device = torch.device(device) if not isinstance(device, torch.device) else device
    rect = True
    if Path(str(weights)).suffix == ".onnx":
        from utils.export.onnx_backend import load_onnx_model

        model, meta = load_onnx_model(weights, device)
        if not meta["dynamic_hw"]:
            if imgsz != meta["imgsz"][0]:
                LOGGER.warning(f"{weights}: static ONNX model, running at its exported size {meta['imgsz'][0]}")
            imgsz, rect = meta["imgsz"][0], False
        nc = meta["nc"]
    else:
        model, meta = load_model(weights, device=device, fuse=True)
        nc = meta["nc"]
    quantized = is_prepared(model)
    if augment and (quantized or not isinstance(model, torch.nn.Module)):
        raise ValueError(f"{weights}: --augment (test-time augmentation) needs a float PyTorch model")
    half = half and device.type == "cuda" and isinstance(model, torch.nn.Module) and not quantized
    model = (model.half() if half else model.float()).eval()
    imgsz = check_img_size(imgsz, max(int(model.stride.max()), 32))
    return Detector(model, str(weights), device, imgsz, _names(getattr(model, "names", None), data, nc), rect, half)


def label_rows(boxes: torch.Tensor, shape0: Sequence[int], save_conf: bool = False) -> list[str]:
    """YOLO label lines for detections, as upstream's detect.py writes them (last detection first).

    Each line is ``class x_center y_center width height`` normalised by the image size, plus the
    confidence with ``save_conf``, every number in ``%g`` format.
    """
    gain = torch.tensor(shape0[:2], dtype=torch.float32)[[1, 0, 1, 0]]
    lines = []
    for *xyxy, conf, cls in reversed(boxes.tolist()):
        xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
        row = (cls, *xywh, conf) if save_conf else (cls, *xywh)
        lines.append(("%g " * len(row)).rstrip() % row)
    return lines
