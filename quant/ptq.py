"""Post-training quantization of a prepared model: calibrate every observer, then (when the config
asks for it) correct the conv biases. The same function sets the starting point of a QAT run, so
QAT begins exactly where PTQ ends.

Example::

    prepared = prepare(model, example, config)
    summary = post_training_quantize(prepared, loader, n_images=512, config=config)
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import torch.nn as nn

from quant.bias_correction import correct_bias
from quant.calibrate import calibrate
from quant.config import QuantConfig

LOGGER = logging.getLogger(__name__)


def post_training_quantize(model: nn.Module, batches: Iterable, n_images: int, config: QuantConfig,
                           device="cpu") -> dict:
    """Calibrate on up to `n_images` images of `batches` (re-iterated for each pass), then bias
    correction if `config.bias_correction`. Leaves the model in eval mode with observers frozen.
    Returns what was done and how long each step took: {'images', 'calibrate_s', 'bias_corrected',
    'bias_correction_s'}."""
    start = time.perf_counter()
    seen = calibrate(model, batches, n_images, device)
    summary = {"images": seen, "calibrate_s": time.perf_counter() - start, "bias_corrected": 0,
               "bias_correction_s": 0.0}
    if config.bias_correction:
        start = time.perf_counter()
        summary["bias_corrected"] = len(correct_bias(model, batches, n_images, device))
        summary["bias_correction_s"] = time.perf_counter() - start
    model.eval()
    LOGGER.info(f"PTQ: {seen} images, calibration {summary['calibrate_s']:.1f}s"
                + (f", bias correction {summary['bias_correction_s']:.1f}s" if config.bias_correction else ""),
                extra={"ptq_summary": dict(summary)})
    return summary
