"""Loading any weights val.py takes (float or QAT .pt, exported .onnx) as a :class:`Detector` for detect.py.

Example:
    >>> det = load_detector("yolov5n.pt", "cpu", imgsz=320)  # doctest: +SKIP
    >>> pred = det.predict(cv2.imread("bus.jpg"))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from utils.eval.predict import Detector

__all__ = ["load_detector"]

LOGGER = logging.getLogger(__name__)


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
