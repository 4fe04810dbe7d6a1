"""Run one exported detector in onnxruntime and (when installed) OpenVINO, and measure their agreement.

What is measured, and how:

* **integer kernels**: the op types of onnxruntime's own optimised graph (``ORT_ENABLE_ALL``, the graph
  it really runs): a QDQ conv it fuses becomes ``QLinearConv``; one it leaves float stays ``Conv``
  (or ``FusedConv``). :func:`ort_optimized_ops`, :func:`conv_kernels`.
* **head values in quantization steps**, read back from the decoded output (1, N, 5 + nc) that users
  run: decoding is ``sigmoid`` plus exact affine maps per column, so :func:`head_codes` inverts it and
  divides by the head's output step (the scale of the DequantizeLinear each head Sigmoid reads,
  :func:`head_steps`). Exposing the int8 head tensors as extra graph outputs instead would change
  what OpenVINO fuses, hence what it computes. :func:`step_agreement` compares two runs.
* **detections**: NMS on both outputs, then one-to-one pairs of the same class at IoU >= 0.5
  (:func:`utils.eval.box_match.match_detections`).

The reference is onnxruntime with every graph optimisation off: each QuantizeLinear and
DequantizeLinear then runs on its own, which is the ONNX specification's arithmetic.

Example:
    >>> ops = ort_optimized_ops("qat.onnx")  # doctest: +SKIP
    >>> conv_kernels(ops)  # doctest: +SKIP
    ConvKernels(integer=60, float=0)
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from utils.export.onnx_backend import import_optional, session_options

__all__ = ["ConvKernels", "StepAgreement", "conv_kernels", "decoded_levels", "head_codes", "head_steps",
           "match_after_nms", "onnxruntime_runner", "openvino_runner", "ort_optimized_ops", "step_agreement"]

LOGGER = logging.getLogger(__name__)

INTEGER_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv")


@dataclass(frozen=True)
class ConvKernels:
    """How many convs of an optimised graph run on integer kernels and how many stay float."""

    integer: int
    float: int


@dataclass(frozen=True)
class StepAgreement:
    """Two runs' head values compared in quantization steps."""

    max_steps: int
    over_one: float  # fraction of values more than one step apart
    differ: float  # fraction of values not identical
    values: int


def ort_optimized_ops(path: str | Path) -> Counter:
    """Op types (with counts) of the graph onnxruntime runs for ``path`` on CPU with all optimisations."""
    ort = import_optional("onnxruntime", "counting onnxruntime's optimised ops")
    onnx = import_optional("onnx", "counting onnxruntime's optimised ops")
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # it warns that the saved graph is specific to this CPU: we only count
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    return Counter(node.op_type for node in model.graph.node)


def conv_kernels(ops: Counter) -> ConvKernels:
    """Integer and float conv counts of :func:`ort_optimized_ops`' result."""
    return ConvKernels(sum(ops[k] for k in INTEGER_CONVS), sum(ops[k] for k in FLOAT_CONVS))


def head_steps(model: Any, levels: int) -> list[Optional[float]]:
    """Output step of each head level: the scale of the DequantizeLinear that each of the last
    ``levels`` Sigmoid nodes (the head's, in level order) reads through reshapes; None for a float head."""
    from quant.qdq_onnx import read_steps

    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"][-levels:]
    if len(sigmoids) != levels:
        raise ValueError(f"expected {levels} head Sigmoid nodes, found {len(sigmoids)}")
    return read_steps(model, [n.input[0] for n in sigmoids])


def decoded_levels(decoded: np.ndarray, strides: Sequence[int], na: int, hw: tuple[int, int]) -> list[np.ndarray]:
    """Split a decoded output (bs, N, no) into its levels, each (bs, na, ny, nx, no)."""
    bs, n, no = decoded.shape
    sizes = [(hw[0] // s, hw[1] // s) for s in strides]
    if sum(na * ny * nx for ny, nx in sizes) != n:
        raise ValueError(f"decoded output has {n} rows; strides {list(strides)} at {hw[0]}x{hw[1]} give "
                         f"{sum(na * ny * nx for ny, nx in sizes)}")
    out, start = [], 0
    for ny, nx in sizes:
        out.append(decoded[:, start:start + na * ny * nx].reshape(bs, na, ny, nx, no))
        start += na * ny * nx
    return out


def head_codes(decoded: np.ndarray, strides: Sequence[int], anchors_px: Sequence, hw: tuple[int, int],
               steps: Sequence[Optional[float]]) -> list[np.ndarray]:
    """The head's pre-sigmoid values per level in quantization steps, recovered from the decoded output.

    Decoding (v7.0): xy = (2 sig - 0.5 + cell) * stride, wh = (2 sig)^2 * anchor, the rest sig. Each
    value is inverted in float64 and divided by its level's step, then rounded: a quantized head's
    values sit on that grid, and float32 decoding keeps them well within half a step (the largest
    error, x/y of a saturated value at 640 pixels, is about 0.2 step). A float head (step None) is
    returned in units of 1/16 without rounding.
    """
    anchors = np.asarray(anchors_px, dtype=np.float64)
    na = anchors.shape[1]
    codes = []
    for i, (level, s, step) in enumerate(zip(decoded_levels(decoded.astype(np.float64), strides, na, hw),
                                             strides, steps)):
        _, _, ny, nx, _ = level.shape
        gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        sig = level.copy()
        sig[..., 0] = (level[..., 0] / s + 0.5 - gx) / 2
        sig[..., 1] = (level[..., 1] / s + 0.5 - gy) / 2
        sig[..., 2:4] = np.sqrt(np.maximum(level[..., 2:4], 0) / anchors[i].reshape(1, na, 1, 1, 2)) / 2
        sig = np.clip(sig, 1e-12, 1 - 1e-12)
        logit = np.log(sig) - np.log1p(-sig)
        codes.append(np.rint(logit / step).astype(np.int64) if step else logit * 16)
    return codes


def step_agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> StepAgreement:
    """Compare two runs' head codes (lists of equally shaped arrays, e.g. several levels or images)."""
    diffs = np.concatenate([np.zeros(0)] + [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel()
                                            for x, y in zip(a, b)])
    if not diffs.size:
        return StepAgreement(0, 0.0, 0.0, 0)
    return StepAgreement(int(np.ceil(diffs.max() - 1e-9)), float((diffs > 1).mean()), float((diffs > 0).mean()),
                         int(diffs.size))


def match_after_nms(a: np.ndarray, b: np.ndarray, conf_thres: float = 0.25, iou_thres: float = 0.45,
                    match_iou: float = 0.5) -> list[tuple[int, int, int]]:
    """Per image of two decoded outputs: (boxes in a, boxes in b, matched pairs) after NMS."""
    from utils.eval.box_match import match_detections
    from utils.eval.nms import non_max_suppression

    da = non_max_suppression(torch.from_numpy(np.ascontiguousarray(a)).float(), conf_thres, iou_thres)
    db = non_max_suppression(torch.from_numpy(np.ascontiguousarray(b)).float(), conf_thres, iou_thres)
    out = []
    for x, y in zip(da, db):
        result = match_detections(x, y, match_iou)
        out.append((result.n_a, result.n_b, result.matched))
    return out


def onnxruntime_runner(path: str | Path, optimize: bool = True,
                       exact_int8: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """A function image batch -> first output, on onnxruntime's CPU provider; ``optimize=False`` turns
    every graph optimisation off (the specification's arithmetic, node by node); ``exact_int8=False``
    runs onnxruntime's default 8-bit kernels (utils.export.onnx_backend.EXACT_INT8_CONFIG says why not)."""
    ort = import_optional("onnxruntime", "running ONNX models")
    options = session_options(ort, optimize=optimize, exact_int8=exact_int8)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(path: str | Path, device: str = "CPU") -> Optional[tuple[Callable[[np.ndarray], np.ndarray], str]]:
    """(image batch -> first output, version) with OpenVINO's default settings, or None when the
    ``openvino`` package is not installed (it is not a dependency of this project)."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), device)
    return (lambda x: compiled([x])[compiled.output(0)]), ov.__version__.split("-")[0]
