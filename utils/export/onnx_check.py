"""Check an exported ONNX file against the PyTorch model it came from, on real or random images.

Tolerance rule (stated once, used everywhere): for every output, each last-axis column ``c`` (box x,
y, w, h, objectness, each class; or a raw map's channel) has a scale ``s_c = max(1, max|torch[..., c]|)``.
The file passes when ``max |onnx - torch| / s_c <= tol`` over all elements, with ``tol = 1e-3`` for
fp32 files and ``1e-2`` for fp16 ones. So box coordinates at 640 pixels may differ by 0.64 px in
fp32 and probabilities by 0.001 absolute.

Example:
    >>> inputs = [sample_batch([Path("bus.jpg")], 1, (320, 320))]  # doctest: +SKIP
    >>> results = verify_onnx(Path("yolov5n.onnx"), wrapper, inputs, FLOAT_TOL)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from utils.export.onnx_backend import import_optional, onnxruntime_errors, session_options, session_providers

__all__ = ["FLOAT_TOL", "HALF_TOL", "CheckResult", "compare_outputs", "sample_batch", "verify_onnx"]

LOGGER = logging.getLogger(__name__)

FLOAT_TOL = 1e-3
HALF_TOL = 1e-2


@dataclass
class CheckResult:
    """onnxruntime vs PyTorch on one input batch."""

    shape: tuple
    max_abs: float
    max_scaled: float
    tol: float

    @property
    def passed(self) -> bool:
        return bool(self.max_scaled <= self.tol)

    def line(self) -> str:
        return (f"input {self.shape}: max abs diff {self.max_abs:.3g}, max scaled diff {self.max_scaled:.3g} "
                f"(tolerance {self.tol:g} x max(1, |column max|)) {'PASS' if self.passed else 'FAIL'}")


def sample_batch(images: Sequence[Path] | None, batch: int, imgsz: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A float batch (batch, 3, h, w) in [0, 1]: the images letterboxed to exactly ``imgsz`` (RGB) and
    repeated to fill the batch, or uniform random values when no images are given."""
    from utils.data.images import letterbox, read_image

    h, w = imgsz
    if not images:
        return torch.rand((batch, 3, h, w), generator=torch.Generator().manual_seed(seed))
    ims = []
    for path in images:
        im = letterbox(read_image(path), (h, w), auto=False)[0]
        ims.append(torch.from_numpy(np.ascontiguousarray(im[:, :, ::-1].transpose(2, 0, 1))))
    stack = torch.stack([ims[i % len(ims)] for i in range(batch)])
    return stack.float() / 255


def compare_outputs(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max abs diff, max column-scaled diff) over paired outputs; see the module's tolerance rule."""
    if len(ref) != len(got):
        raise ValueError(f"output count differs: PyTorch {len(ref)}, onnxruntime {len(got)}")
    max_abs = max_scaled = 0.0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            raise ValueError(f"output shape differs: PyTorch {r.shape}, onnxruntime {g.shape}")
        r, g = r.astype(np.float64), g.astype(np.float64)
        diff = np.abs(r - g)
        if not np.isfinite(diff).all():
            return float("inf"), float("inf")
        scale = np.maximum(1.0, np.abs(r).reshape(-1, r.shape[-1]).max(0))
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_scaled = max(max_scaled, float((diff / scale).max(initial=0.0)))
    return max_abs, max_scaled


def _torch_outputs(wrapper: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        y = wrapper(x)
    return [t.detach().float().cpu().numpy() for t in (y if isinstance(y, (tuple, list)) else [y])]


def verify_onnx(file: Path, wrapper: nn.Module, inputs: Sequence[torch.Tensor], tol: float) -> list[CheckResult]:
    """Run ``file`` in onnxruntime and ``wrapper`` (the exported module, on its device and dtype) on
    each input batch; returns one CheckResult per batch. Raises nothing on disagreement: callers
    decide (export_job raises with the max abs diff)."""
    ort = import_optional("onnxruntime", "checking the exported ONNX model")
    param = next(wrapper.parameters())
    try:
        session = ort.InferenceSession(str(file), session_options(ort), providers=session_providers(ort, param.device))
    except onnxruntime_errors() as err:  # e.g. fp16 kernels missing on the CPU provider
        raise ValueError(f"{file}: onnxruntime cannot run it: {(str(err).strip().splitlines() or ['?'])[0]}") from err
    name = session.get_inputs()[0].name
    results = []
    for x in inputs:
        x = x.to(device=param.device, dtype=param.dtype)
        ref = _torch_outputs(wrapper, x)
        got = session.run(None, {name: x.cpu().numpy()})
        max_abs, max_scaled = compare_outputs(ref, got)
        results.append(CheckResult(tuple(x.shape), max_abs, max_scaled, tol))
    return results
