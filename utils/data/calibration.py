"""PTQ calibration on training images: the loader that picks them and the quant.ptq call that reads them.

It lives with the data because choosing the images is the part that knows YOLO datasets (what
``val.py --ptq``, ``train.py --qat`` and the PTQ sensitivity sweep share); quant.ptq does the rest.

Example:
    >>> calibrate_on_training_images(prepared, data, 640, n_images=256)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def calibrate_on_training_images(prepared: nn.Module, data: dict, imgsz: int, n_images: int, device: Any = "cpu",
                                 workers: int = 2) -> dict:
    """PTQ of a prepared model on up to `n_images` training images (quant.ptq: calibration, then bias
    correction when its config asks): what `val.py --ptq` scores and where a QAT run starts.

    The images are letterboxed squares without augmentation, in a seeded random order: rect batches
    come sorted by aspect ratio, so the first N of them would be a biased sample."""
    from quant.ptq import post_training_quantize
    from utils.data.dataset import create_dataloader
    from utils.log import colorstr

    stride = max(int(prepared.stride.max()), 32)
    source = data.get("train") or data["val"]
    loader = create_dataloader(source, imgsz, 32, stride, rect=False, workers=workers, shuffle=True,
                               prefix=colorstr("calibration: "))[0]
    return post_training_quantize(prepared, loader, n_images, prepared.quant_config, device)
