"""Bias correction: remove the mean output shift that weight quantization causes, per channel.

Rounding a conv's weights changes its output by ``conv(x, W_q - W)``, whose mean over the
calibration images is not zero: every layer's output moves a little and later layers compound it.
This pass measures that mean per output channel on the inputs each conv really receives in the
quantized model, and takes it off the conv's output (see ``shift_output`` of the fused modules:
with BN into the running mean, else into the bias, which the integer model still holds on its int32
grid).  Run it after calibration, in eval mode; it needs no labels.

Example::

    calibrate(prepared, loader, 512)
    shifts = correct_bias(prepared, loader, 128)   # {module name: largest |shift|}
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn

from quant.calibrate import iter_images
from quant.fused import quantized_convs

LOGGER = logging.getLogger(__name__)


def correctable_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused QAT conv whose weight quantizer is active."""
    return quantized_convs(model, active_only=True)


@torch.no_grad()
def measure_output_shift(model: nn.Module, batches: Iterable, n_images: int, device="cpu") -> dict[str, torch.Tensor]:
    """Mean of ``conv(x, W_q - W)`` per output channel for every correctable conv, over up to
    ``n_images`` images (uint8 dataloader batches or float images in [0, 1])."""
    convs = correctable_convs(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    errors = {name: module.weight_error() for name, module in convs}
    handles = []
    for name, module in convs:
        def hook(mod, args, _out, name=name):
            err = mod.conv_only(args[0], errors[name].to(args[0].dtype)).double()
            sums[name] = sums.get(name, 0) + err.sum(dim=(0, 2, 3))
            counts[name] = counts.get(name, 0) + err.numel() // err.shape[1]
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for im in iter_images(batches, n_images, device):
            model(im)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Iterable, n_images: int, device="cpu") -> dict[str, float]:
    """Measure (see :func:`measure_output_shift`) and remove each conv's mean output shift.
    Returns {conv name: largest |shift| removed}; convs with no bias and no BN are left as they are."""
    if n_images <= 0:
        raise ValueError(f"bias correction needs at least one image, got n_images={n_images}")
    shifts = measure_output_shift(model, batches, n_images, device)
    modules = dict(model.named_modules())
    done: dict[str, float] = {}
    for name, delta in shifts.items():
        if modules[name].shift_output(delta.to(next(modules[name].parameters()).device)):
            done[name] = float(delta.abs().max())
        else:
            LOGGER.info(f"bias correction: {name} has no bias and no BN, left uncorrected")
    LOGGER.info(f"PTQ: bias-corrected {len(done)} convs "
                f"(largest mean shift {max(done.values(), default=0.0):.3g})")
    return done
