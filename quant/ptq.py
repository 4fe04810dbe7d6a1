"""Post-training quantization of a prepared model: calibrate every observer, then (when the config
asks for them) learn the weight rounding and correct the conv biases. The same function sets the starting point of a QAT run, so
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

from quant.adaround import learn_rounding
from quant.bias_correction import correct_bias
from quant.calibrate import calibrate
from quant.config import QuantConfig

LOGGER = logging.getLogger(__name__)


def post_training_quantize(model: nn.Module, batches: Iterable, n_images: int, config: QuantConfig,
                           device="cpu", rounding_images: int = 32) -> dict:
    """Calibrate on up to `n_images` images of `batches` (re-iterated for each pass); then learned
    rounding on up to `rounding_images` of them if `config.learned_rounding`; then bias correction
    if `config.bias_correction`. Leaves the model in eval mode with observers frozen. Returns what was
    done and how long each step took: {'images', 'calibrate_s', 'learned_rounding_s', 'bias_corrected',
    'bias_correction_s'}."""
    start = time.perf_counter()
    seen = calibrate(model, batches, n_images, device)
    summary = {"images": seen, "calibrate_s": time.perf_counter() - start, "learned_rounding_s": 0.0,
               "bias_corrected": 0, "bias_correction_s": 0.0}
    if config.learned_rounding:
        start = time.perf_counter()
        learn_rounding(model, batches, min(n_images, rounding_images), device=device)
        summary["learned_rounding_s"] = time.perf_counter() - start
    if config.bias_correction:
        start = time.perf_counter()
        summary["bias_corrected"] = len(correct_bias(model, batches, n_images, device))
        summary["bias_correction_s"] = time.perf_counter() - start
    model.eval()
    steps = [f"calibration {summary['calibrate_s']:.1f}s"]
    if config.learned_rounding:
        steps.append(f"learned rounding {summary['learned_rounding_s']:.1f}s")
    if config.bias_correction:
        steps.append(f"bias correction {summary['bias_correction_s']:.1f}s")
    LOGGER.info(f"PTQ: {seen} images, " + ", ".join(steps), extra={"ptq_summary": dict(summary)})
    return summary
