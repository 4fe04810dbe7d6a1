"""Convert a prepared (QAT) model for QDQ ONNX export, finish the ONNX file, and describe its ranges.

:func:`convert_for_export` turns the prepared fx graph into a plain float module whose only
quantization ops are the core ``torch.fake_quantize_per_*_affine`` calls with *constant* power-of-2
scales, so torch's TorchScript-based exporter writes them as QuantizeLinear/DequantizeLinear:

* every fused conv (BN folded: ``W_fold``, ``b_fold`` from ``folded_weight_and_bias``) becomes
  ``act(conv(x, fq_w(W_fold)) + b_q)`` where ``fq_w`` uses the trained per-channel exponents
  (never recomputed) and ``b_q`` is the bias rounded (half to even) to the int32 grid
  ``s_in * s_w[c]`` of the conv's input and weight scales, exactly as the integer reference
  (:mod:`quant.integer_ref`) holds it; a conv whose input is not quantized keeps a float bias;
* every activation quantizer becomes a per-tensor fake-quant with zero point 0 and range
  ``[0, 255]`` (uint8) or ``[-128, 127]`` (int8).  Quantizers wider than 8 bits are exported
  float with a warning: ONNX only has int16 QuantizeLinear from opset 21, which the TorchScript
  exporter cannot write.

:func:`finalize_qdq_onnx` then stores each quantized weight as an int8 initializer read by one
DequantizeLinear and each such bias as int32 + DequantizeLinear (the pattern onnxruntime and NPU
compilers fuse into an integer conv).  :func:`quant_ranges` builds the ``.ranges.json`` content and
:func:`check_qdq_structure` asserts the file's invariants (power-of-2 scales, aligned concats).

Example:
    >>> export_model = convert_for_export(prepared)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv, QATConvBnAct, make_act
from quant.graph import input_quantizer_of, leaf_conv_inputs, set_submodule
from quant.qdq_onnx import activation_tensor_names, check_qdq_structure, finalize_qdq_onnx, openvino_guards

__all__ = ["QUANT_SCHEME", "QdqActivation", "QdqConv", "QdqExport", "activation_tensor_names", "check_qdq_structure",
           "convert_for_export", "export_qdq", "exportable", "finalize_qdq_onnx", "quant_ranges", "quantizer_ranges",
           "recording_quantizer_calls", "round_bias"]

LOGGER = logging.getLogger(__name__)

QUANT_SCHEME = "pow2-int8"
MAX_ONNX_BITS = 8  # int8/uint8 QuantizeLinear: every opset the TorchScript exporter writes


def exportable(fq: Pow2FakeQuantize) -> bool:
    """True when ``fq`` quantizes in the exported file (calibrated, enabled, at most 8 bits)."""
    return fq.emits_int()


def _input_quantizer(gm: fx.GraphModule, node: Any) -> Optional[Pow2FakeQuantize]:
    fq = input_quantizer_of(gm, node)
    return fq if fq is not None and exportable(fq) else None


class QdqActivation(nn.Module):
    """Per-tensor fake quantization with a frozen power-of-2 scale (exports as Q/DQ)."""

    def __init__(self, fq: Pow2FakeQuantize, name: str = "") -> None:
        super().__init__()
        self.source = name
        self.bits, self.signed = fq.bits, fq.signed
        self.quant_min, self.quant_max = fq.quant_min, fq.quant_max
        self.enabled = exportable(fq)
        self.scale = float(fq.scale().reshape(-1)[0])
        if not self.enabled and bool(fq.calibrated) and fq.bits > MAX_ONNX_BITS:
            LOGGER.warning("%s: %d-bit activation quantizer exported as float (ONNX int16 Q/DQ needs opset 21)",
                           name, fq.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, 0, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        kind = f"{'int' if self.signed else 'uint'}{self.bits}" if self.enabled else "float"
        return f"{kind}, scale 2^{int(math.log2(self.scale))}"


class QdqConv(nn.Module):
    """``act(conv(x, fq(W)) + b)`` with frozen per-channel weight scales, plus an optional output quantizer."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, weight_fq: Pow2FakeQuantize,
                 act: Optional[str], out_quant: Optional[nn.Module] = None, name: str = "") -> None:
        super().__init__()
        self.source = name
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {conv.padding_mode!r} is not supported in QDQ export")
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.quantize_weight = exportable(weight_fq)
        if not self.quantize_weight and bool(weight_fq.calibrated) and weight_fq.bits > MAX_ONNX_BITS:
            LOGGER.warning("%s: %d-bit weights exported as float", name, weight_fq.bits)
        self.register_buffer("w_scale", weight_fq.scale().detach().float().clone().expand(weight.shape[0]).clone())
        self.register_buffer("w_zero", torch.zeros(weight.shape[0], dtype=torch.int32))
        self.w_min, self.w_max = weight_fq.quant_min, weight_fq.quant_max
        self.act = make_act(act)
        self.out_quant = out_quant if out_quant is not None else nn.Identity()

    def quantized_weight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.weight
        return torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zero, 0, self.w_min, self.w_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.out_quant(self.act(y))


def _act_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Identity):
        return None
    raise ValueError(f"fused activation {type(module).__name__} cannot be exported")


def round_bias(bias: torch.Tensor, in_scale: Optional[float], w_scale: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(bias on the int32 grid ``s_in * s_w`` as float, its int64 codes) — codes None without ``in_scale``.

    Rounding is half to even (torch.round), the rule the fake-quant ops use for activations.
    """
    if in_scale is None:
        return bias.float(), None
    step = in_scale * w_scale.double().reshape(-1)
    codes = torch.round(bias.double() / step).to(torch.int64)
    limit = 2 ** 31 - 1
    if codes.abs().max().item() > limit:
        raise ValueError(f"bias does not fit int32 at scale s_in*s_w (max code {codes.abs().max().item()})")
    return (codes.double() * step).float(), codes


def _qdq_from_fused(name: str, fused: QATConvBnAct, in_fq: Optional[Pow2FakeQuantize]) -> QdqConv:
    weight, bias = fused.folded_weight_and_bias()
    fq = fused.weight_fake_quant
    in_scale = float(in_fq.scale()[0]) if in_fq is not None and exportable(fq) else None
    bias, _ = round_bias(bias, in_scale, fq.scale())
    return QdqConv(fused.conv, weight, bias, fq, _act_kind(fused.act), name=name)


def _qdq_from_head(name: str, conv: QATConv, in_fq: Optional[Pow2FakeQuantize]) -> QdqConv:
    weight, bias = conv.folded_weight_and_bias()
    fq = conv.weight_fake_quant
    in_scale = float(in_fq.scale()[0]) if in_fq is not None and exportable(fq) else None
    bias, _ = round_bias(bias, in_scale, fq.scale())
    out = conv.out_quant
    out_q = QdqActivation(out, f"{name}.out_quant") if isinstance(out, Pow2FakeQuantize) else None
    return QdqConv(conv, weight, bias, fq, None, out_q, name=name)


@torch.no_grad()
def convert_for_export(prepared: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``prepared`` (eval mode) with QDQ-exportable modules (see the module docstring).

    The copy computes what the prepared model computes in eval mode, except that conv biases sit
    on the int32 grid and BN is folded, so outputs agree to within float rounding plus the bias
    rounding (far below one output quantization step).
    """
    model = copy.deepcopy(prepared).eval()
    swaps: dict[str, nn.Module] = {}
    shared: dict[int, QdqActivation] = {}
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(str(node.target))
        if isinstance(module, QATConvBnAct) and str(node.target) not in swaps:
            swaps[str(node.target)] = _qdq_from_fused(str(node.target), module, _input_quantizer(model, node.args[0]))
        elif any(isinstance(m, QATConv) for m in module.modules()) and not isinstance(module, QATConv):
            for name, conv, arg in leaf_conv_inputs(model, node):
                swaps[name] = _qdq_from_head(name, conv, _input_quantizer(model, arg))
        elif isinstance(module, Pow2FakeQuantize):
            # one instance per shared quantizer: the same scale wherever the graph calls it
            swaps.setdefault(str(node.target), shared.setdefault(id(module), QdqActivation(module, str(node.target))))
    for name, module in sorted(swaps.items(), key=lambda kv: -kv[0].count(".")):
        set_submodule(model, name, module)
    model.recompile()
    return model.eval()


# ---------------------------------------------------------------------------------- the entry point
@dataclass
class QdqExport:
    """What :func:`export_qdq` wrote: the converted module (BN folded, constant scales: the reference
    to check the file against, so nothing converts twice), the final ONNX model, its structure summary
    and the ``.ranges.json`` content."""

    converted: fx.GraphModule
    onnx_model: Any
    summary: dict[str, Any]
    ranges: dict[str, Any]


def _plain_torch_export(module: nn.Module, example: torch.Tensor, file: Path) -> None:
    torch.onnx.export(module, (example,), str(file), dynamo=False, opset_version=17)


def export_qdq(prepared: fx.GraphModule, example: torch.Tensor, file: Union[str, Path],
               wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
               torch_export: Optional[Callable[[nn.Module, torch.Tensor, Path], None]] = None,
               converted: Optional[fx.GraphModule] = None, openvino_compat: bool = False,
               kernel_layout: bool = True) -> QdqExport:
    """Write ``prepared`` as a QDQ ONNX file: convert -> record the quantizer calls -> torch.onnx.export
    -> finalize (int8 weights, int32 biases) -> check the structure -> ranges. Raises ValueError when
    a check fails.

    ``wrap`` puts the converted module in the caller's export wrapper (e.g. a detection head's output
    layout); ``torch_export(module, example, file)`` runs torch.onnx.export with the caller's names,
    opset and dynamic axes (default: the TorchScript exporter, opset 17); ``converted`` reuses an
    earlier conversion of the same model; ``openvino_compat`` applies :func:`quant.qdq_onnx.openvino_guards`
    (numerically a no-op); ``kernel_layout`` the exact rewrites onnxruntime's integer kernels run faster
    (:func:`quant.qdq_onnx.finalize_qdq_onnx`).

    Example:
        >>> result = export_qdq(prepared, torch.zeros(1, 3, 64, 64), "model.onnx")  # doctest: +SKIP
        >>> result.summary["quantize"], result.ranges["activations"].keys()
    """
    try:
        import onnx
    except ImportError as err:
        raise ImportError("QDQ export needs the onnx package: pip install onnx") from err
    file = Path(file)
    converted = converted if converted is not None else convert_for_export(prepared).float()
    module = wrap(converted) if wrap is not None else converted
    with recording_quantizer_calls(module) as calls:
        (torch_export or _plain_torch_export)(module, example.float(), file)
    model = finalize_qdq_onnx(onnx.load(str(file)), kernel_layout=kernel_layout)
    if openvino_compat:
        openvino_guards(model)
    summary = check_qdq_structure(model)
    ranges = quant_ranges(prepared, module, model, calls)
    onnx.save(model, str(file))
    return QdqExport(converted, model, summary, ranges)


# ---------------------------------------------------------------------------------- names and ranges
@contextmanager
def recording_quantizer_calls(model: nn.Module) -> Iterator[list[str]]:
    """Record the module name of every exported activation quantizer in call order while tracing.

    The exporter emits one QuantizeLinear per call in the same order, which is how
    :func:`activation_tensor_names` maps ONNX tensors back to quantizer modules.
    """
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append(mod.source))
               for m in {id(m): m for m in model.modules() if isinstance(m, QdqActivation) and m.enabled}.values()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _exp_list(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def quantizer_ranges(fq: Pow2FakeQuantize) -> dict[str, Any]:
    """Plain-data description of one quantizer: dtype, bits, exponents, representable/observed range."""
    shift = fq.bits - int(fq.signed)
    k = _exp_list(fq.exponent)
    scale = fq.scale().double()
    entry = {
        "dtype": f"{'int' if fq.signed else 'uint'}{fq.bits}", "bits": fq.bits, "signed": fq.signed,
        "per_channel": bool(fq.spec.per_channel), "fixed": fq.fixed, "calibrated": bool(fq.calibrated),
        "exported": "quantized" if exportable(fq) else "float",
        "range_exponent": k if fq.spec.per_channel else k[0],  # k: |x| up to ~2**k is representable
        "scale_exponent": [e - shift for e in k] if fq.spec.per_channel else k[0] - shift,
        "quant_min": fq.quant_min, "quant_max": fq.quant_max,
        "min": [fq.quant_min * s for s in scale.tolist()], "max": [fq.quant_max * s for s in scale.tolist()],
        "observed_min": [_finite(v) for v in fq.min_val.tolist()],
        "observed_max": [_finite(v) for v in fq.max_val.tolist()],
    }
    if not fq.spec.per_channel:
        for key in ("min", "max", "observed_min", "observed_max"):
            entry[key] = entry[key][0]
        entry["scale"] = float(scale[0])
    return entry


def quant_ranges(prepared: nn.Module, export_model: Optional[nn.Module] = None, onnx_model: Any = None,
                 calls: Optional[list[str]] = None) -> dict[str, Any]:
    """The ``.ranges.json`` content: every activation and weight quantizer by module name, and (given
    the exported ONNX model and the recorded quantizer calls) every quantized ONNX tensor by name."""
    acts, weights = {}, {}
    for name, module in prepared.named_modules(remove_duplicate=False):
        if not isinstance(module, Pow2FakeQuantize):
            continue
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight_fake_quant":
            weights.setdefault(owner, quantizer_ranges(module))
        else:
            acts.setdefault(name, quantizer_ranges(module))
    tensors: dict[str, dict[str, str]] = {}
    if onnx_model is not None and calls is not None:
        scales = {n: e["scale"] for n, e in acts.items() if "scale" in e}
        for module, pairs in activation_tensor_names(onnx_model, calls, scales).items():
            acts[module]["onnx_tensors"] = pairs
            for pair in pairs:
                tensors[pair["quantized"]] = {"module": module, "kind": "activation"}
        inits = {i.name for i in onnx_model.graph.initializer}
        prefix = _param_prefix(export_model, inits) if export_model is not None else ""
        for module, entry in weights.items():
            for suffix in ("weight_quantized", "bias_quantized"):
                tensor = f"{prefix}{module}.{suffix}"
                if tensor in inits:
                    entry["onnx_" + suffix.split("_")[0]] = tensor
                    tensors[tensor] = {"module": module, "kind": suffix.split("_")[0]}
    return {"scheme": QUANT_SCHEME, "activations": acts, "weights": weights, "tensors": tensors}


def _param_prefix(export_model: nn.Module, inits: set[str]) -> str:
    """The prefix a wrapper adds to parameter names in the file (e.g. 'model.' for an export wrapper)."""
    for name, module in export_model.named_modules():
        if isinstance(module, QdqConv) and module.source:
            for init in inits:
                if init.endswith(f"{module.source}.weight_quantized"):
                    return init[: -len(f"{module.source}.weight_quantized")]
    return ""
