"""Model size summary: layers, parameters, gradients and GFLOPs, as upstream YOLOv5 prints them.

GFLOPs are counted with forward hooks: 2 x multiply-accumulates of convs and linears, one
multiply-accumulate per BatchNorm element (so fusing lowers the count, as upstream's printout
shows), one op per nearest-upsampled output (as thop counts it), on a stride-sized input and
scaled to ``imgsz`` as upstream does with thop. thop is never required.
"""
from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from models.activations import is_activation

__all__ = ["model_info", "model_summary", "count_layers", "count_gflops"]

LOGGER = logging.getLogger(__name__)


def count_layers(model: nn.Module) -> int:
    """Module count as upstream v7.0 reports it.

    Upstream shares one activation instance across all Conv blocks, and its fuse() deletes
    BatchNorm. So activations of one kind count once and Identity placeholders not at all, which
    reproduces v7.0's "214 layers" (157 fused) for yolov5s with per-block activations.
    """
    count, seen_acts = 0, set()
    for m in model.modules():
        if isinstance(m, nn.Identity):
            continue
        if is_activation(m):
            key = (type(m), getattr(m, "negative_slope", None))
            if key in seen_acts:
                continue
            seen_acts.add(key)
        count += 1
    return count


def _macs_hook(totals: list[float]):
    def hook(m: nn.Module, inputs, output) -> None:
        if isinstance(m, nn.modules.conv._ConvNd):
            kernel = m.weight.shape[2:].numel()
            totals[0] += output.numel() * (m.in_channels // m.groups) * kernel
        elif isinstance(m, nn.Linear):
            totals[0] += output.numel() * m.in_features
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            totals[0] += output.numel()  # inference BN is a scale and a shift: one MAC per element
        elif isinstance(m, nn.Upsample) and m.mode == "nearest":
            totals[0] += output.numel()
    return hook


@torch.no_grad()
def count_gflops(model: nn.Module, imgsz: int | list[int] = 640) -> float | None:
    """GFLOPs at ``imgsz`` (int or [h, w]); None when the model has no parameters or input channels."""
    p = next(model.parameters(), None)
    if p is None or p.dim() < 2:
        return None
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    probe = deepcopy(model).eval()  # never touch the real model (grids, BN statistics, modes)
    totals = [0.0]
    handles = [m.register_forward_hook(_macs_hook(totals)) for m in probe.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Upsample, nn.modules.batchnorm._BatchNorm))]
    try:
        probe(torch.zeros((1, p.shape[1], stride, stride), device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    size = imgsz if isinstance(imgsz, (list, tuple)) else [imgsz, imgsz]
    return 2 * totals[0] / 1e9 * size[0] / stride * size[1] / stride


def model_info(model: nn.Module, imgsz: int | list[int] = 640, verbose: bool = False) -> dict:
    """Return dict(layers, parameters, gradients, gflops) and log upstream's one-line summary.

    ``verbose`` also logs one line per parameter tensor (name, shape, mean, std).
    """
    if verbose:
        LOGGER.info("%5s %40s %9s %12s %20s %10s %10s", "layer", "name", "gradient", "parameters",
                    "shape", "mu", "sigma")
        for i, (name, p) in enumerate(model.named_parameters()):
            LOGGER.info("%5g %40s %9s %12g %20s %10.3g %10.3g", i, name.replace("module_list.", ""),
                        p.requires_grad, p.numel(), list(p.shape), p.mean().item(),
                        p.std().item() if p.numel() > 1 else 0.0)
    info = _collect(model, imgsz)
    LOGGER.info(model_summary(model, info))
    return info


def _collect(model: nn.Module, imgsz: int | list[int]) -> dict:
    return {"layers": count_layers(model),
            "parameters": sum(x.numel() for x in model.parameters()),
            "gradients": sum(x.numel() for x in model.parameters() if x.requires_grad),
            "gflops": count_gflops(model, imgsz)}


def model_summary(model: nn.Module, info: dict | None = None, imgsz: int | list[int] = 640) -> str:
    """Upstream's line, e.g. 'YOLOv5s summary: 214 layers, 7235389 parameters, 7235389 gradients, 16.5 GFLOPs'."""
    info = info if info is not None else _collect(model, imgsz)
    yaml_file = getattr(model, "yaml_file", None)
    name = Path(yaml_file).stem.replace("yolov5", "YOLOv5") if yaml_file else "Model"
    flops = f", {info['gflops']:.1f} GFLOPs" if info.get("gflops") is not None else ""
    return (f"{name} summary: {info['layers']} layers, {info['parameters']} parameters, "
            f"{info['gradients']} gradients{flops}")
