"""Learned weight rounding (AdaRound, Nagel et al. 2020) on the fixed power-of-2 grid.

Rounding every weight to its nearest grid point minimises the error of each weight, not of the
layer's output. Here, layer by layer in graph order, each weight chooses between the grid point below
and the one above it (a continuous relaxation ``h(V)`` in [0, 1] pushed to 0 or 1 by a regulariser) so
that the layer's output on the calibration images matches the float model's; the grid itself (the
per-channel power-of-2 scale from calibration) does not move. Inputs are what the layer receives in the
quantized model with the earlier layers already rounded, so each layer also compensates upstream
error. The result is written back into the float weights as exact grid values, so the model, its
checkpoint and the export need nothing new.

Example::

    calibrate(prepared, loader, 512)
    learn_rounding(prepared, loader, n_images=32)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from quant.bias_correction import correctable_convs
from quant.calibrate import iter_images
from quant.schedule import flags_restored, set_fake_quant

LOGGER = logging.getLogger(__name__)
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch, as in the paper


@dataclass(frozen=True)
class AdaRoundOptions:
    """iterations per layer, images per step, Adam's rate, the regulariser's weight and its beta
    annealed from ``beta_start`` to ``beta_end`` after ``warmup`` (fraction of iterations without it)."""

    iterations: int = 200
    batch_images: int = 4
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac (the fractional part), so learning starts at the float weight."""
    p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _grid(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(float folded weight, per-channel step broadcastable to it, qmin, qmax)."""
    weight, _ = module.folded_weight_and_bias()
    fq = module.weight_fake_quant
    step = fq.scale().to(weight).reshape(-1, *([1] * (weight.dim() - 1)))
    return weight, step, fq.quant_min, fq.quant_max


def _capture(model: nn.Module, module: nn.Module, images: list[torch.Tensor], quantized: bool) -> list[tuple]:
    """(layer input, layer output) per image batch, with fake quantization on or off everywhere."""
    store: list[tuple] = []
    handle = module.register_forward_hook(lambda _m, args, out: store.append((args[0].detach(), out.detach())))
    try:
        with flags_restored(model), torch.no_grad():
            if not quantized:
                set_fake_quant(model, False)
            for im in images:
                model(im)
    finally:
        handle.remove()
    return store


def _optimise_layer(module: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                    options: AdaRoundOptions, generator: torch.Generator) -> torch.Tensor:
    """Learn the rounding of one layer; returns its new folded weight (exact grid values)."""
    with torch.enable_grad():  # callers may run under no_grad (val.py does)
        return _optimise_layer_with_grad(module, inputs, targets, options, generator)


def _optimise_layer_with_grad(module: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                              options: AdaRoundOptions, generator: torch.Generator) -> torch.Tensor:
    weight, step, qmin, qmax = _grid(module)
    _, bias = module.folded_weight_and_bias()
    floor = torch.floor(weight / step)
    v = _init_v(weight / step - floor).requires_grad_(True)
    act = getattr(module, "act", nn.Identity())
    x_all, y_all = torch.cat(inputs), torch.cat(targets)
    optim = torch.optim.Adam([v], lr=options.lr)
    warm = int(options.warmup * options.iterations)
    for it in range(options.iterations):
        pick = torch.randint(0, x_all.shape[0], (min(options.batch_images, x_all.shape[0]),), generator=generator)
        w_soft = torch.clamp(floor + _h(v), qmin, qmax) * step
        out = act(module.conv_only(x_all[pick], w_soft) + bias.reshape(1, -1, 1, 1))
        loss = (out - y_all[pick]).pow(2).mean()
        if it >= warm:
            progress = (it - warm) / max(1, options.iterations - warm)
            beta = options.beta_end + 0.5 * (options.beta_start - options.beta_end) * (1 + math.cos(math.pi * progress))
            loss = loss + options.reg_weight * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum() / v.numel()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    with torch.no_grad():
        return torch.clamp(floor + (v >= 0).to(floor), qmin, qmax) * step


@torch.no_grad()
def _write_back(module: nn.Module, folded: torch.Tensor) -> None:
    bn = getattr(module, "bn", None)
    if bn is not None:
        sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        safe = torch.where(sf == 0, torch.ones_like(sf), sf).reshape(-1, 1, 1, 1)
        module.conv.weight.copy_(torch.where(sf.reshape(-1, 1, 1, 1) == 0, module.conv.weight, folded / safe))
    else:
        target = module.conv.weight if hasattr(module, "conv") else module.weight
        target.copy_(folded)


def learn_rounding(model: nn.Module, batches: Iterable, n_images: int = 32, options: AdaRoundOptions = AdaRoundOptions(),
                   device="cpu", seed: int = 0) -> dict[str, float]:
    """Learn the weight rounding of every quantized conv of a calibrated model (see the module docstring).
    Returns {layer: output MSE after / with nearest rounding} (< 1 where learning helped)."""
    images = list(iter_images(batches, n_images, device))
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    ratios: dict[str, float] = {}
    start = time.perf_counter()
    try:
        for name, module in correctable_convs(model):
            x_q = [x for x, _ in _capture(model, module, images, quantized=True)]
            y_f = [y for _, y in _capture(model, module, images, quantized=False)]
            with torch.no_grad():
                before = sum(float((module(x) - y).pow(2).sum()) for x, y in zip(x_q, y_f))
            _write_back(module, _optimise_layer(module, x_q, y_f, options, generator))
            with torch.no_grad():
                after = sum(float((module(x) - y).pow(2).sum()) for x, y in zip(x_q, y_f))
            ratios[name] = after / before if before > 0 else 1.0
    finally:
        model.train(was_training)
    LOGGER.info(f"PTQ: learned the weight rounding of {len(ratios)} convs on {sum(len(i) for i in images)} images "
                f"in {time.perf_counter() - start:.0f}s (median output error {_median(ratios):.2f}x nearest rounding)")
    return ratios


def _median(ratios: dict[str, float]) -> float:
    values = sorted(ratios.values())
    return values[len(values) // 2] if values else 1.0
