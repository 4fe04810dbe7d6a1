"""Trained power-of-2 thresholds (TQT) across a model: which parameters they are, their optimizer,
and keeping each quantizer's exponent equal to its rounded threshold.

The thresholds get their own Adam optimizer, without weight decay: their gradients sum the quantization
error over a whole tensor, so their size differs by orders of magnitude between layers, and Adam's
per-parameter normalisation gives every threshold the same step size (``lr`` in log2 units per step).

Example::

    opt = threshold_optimizer(model, lr=0.01)   # None when no quantizer trains its threshold
    loss.backward(); opt.step(); sync_exponents(model)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from quant.schedule import iter_quantizers

THRESHOLD_PARAM = "log2_threshold"


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trained log2 threshold of the model's quantizers (each once)."""
    return [q.log2_threshold for _, q in iter_quantizers(model) if q.log2_threshold is not None]


def is_threshold_parameter(name: str) -> bool:
    """True for a parameter name (as from ``named_parameters``) that is a trained threshold."""
    return name.rsplit(".", 1)[-1] == THRESHOLD_PARAM


def threshold_optimizer(model: nn.Module, lr: float) -> Optional[torch.optim.Optimizer]:
    """Adam over the model's thresholds (no weight decay), or None when it has none."""
    params = threshold_parameters(model)
    return torch.optim.Adam(params, lr=lr, weight_decay=0.0) if params else None


def sync_exponents(model: nn.Module) -> None:
    """Set every trained quantizer's exponent to its rounded threshold (after each optimizer step)."""
    for _, q in iter_quantizers(model):
        q.sync_exponent_from_threshold()
