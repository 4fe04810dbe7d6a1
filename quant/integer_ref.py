"""Integer-only reference: run a prepared (QAT) model the way an NPU would, on integer tensors.

Every activation is an integer code tensor with a power-of-2 scale ``2**e``; convolutions
accumulate exactly (int64 values, computed as a float64 conv whose partial sums are integers far
below 2**53, so the result is exact), the bias is an integer at the accumulator's scale
``s_in * s_w[c]``, and the result is requantized to the next quantizer's scale by an arithmetic
right shift with rounding.  Rounding is half to even by default ('half_even'), the rule of the
fake-quant ops (``nearbyint``); 'half_up' (add ``1 << (shift - 1)`` then shift, what most NPUs
do) is available to measure its cost: it differs from the fake-quant model on every exact tie,
which an add followed by a coarser quantizer produces often.  ReLU/ReLU6 are clamps of the
accumulator, max-pool and nearest upsample work on the codes, concat joins codes of one scale,
add sums codes of one scale.  Any other op runs in float32 on dequantized values and is listed in
:attr:`IntegerModel.float_ops`.

Leaf modules (a detection head) follow the convention of :func:`quant.graph.leaf_conv_inputs`:
their i-th QATConv runs on their i-th input, and the leaf's value is the list of those convs'
quantized outputs (the raw head maps before any reshape).

Example:
    >>> imodel = IntegerModel.from_prepared(prepared)  # doctest: +SKIP
    >>> outs = imodel.run(images_uint8)  # [QTensor(data=int codes, exp=scale exponent), ...]
    >>> compare_with_fake_quant(prepared, images_uint8)["exact_fraction"]  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quant.export import round_bias
from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv, QATConvBnAct
from quant.graph import leaf_conv_inputs

__all__ = ["IntegerModel", "QTensor", "compare_with_fake_quant", "shift_round"]

LOGGER = logging.getLogger(__name__)


@dataclass
class QTensor:
    """Integer codes (int64 holding int8/uint8/int32 values) and scale exponents: value = data * 2**exp.

    ``exp`` is a scalar tensor, or per channel (C,) along dim 1 for a conv accumulator.
    """

    data: torch.Tensor
    exp: torch.Tensor

    def _exp(self) -> torch.Tensor:
        return self.exp.reshape(1, -1, 1, 1) if self.exp.numel() > 1 else self.exp.reshape(())

    def dequantize(self) -> torch.Tensor:
        """float32 values (exact for 8-bit codes: they and the power-of-2 scale fit float32)."""
        return (self.data.double() * torch.pow(2.0, self._exp().double())).float()


def shift_round(v: torch.Tensor, shift: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """``v * 2**-shift`` rounded to an integer (shift > 0: right shift with rounding; <= 0: exact left shift)."""
    shift = shift.to(torch.int64)
    right = shift.clamp_min(0)
    div = torch.pow(torch.tensor(2, dtype=torch.int64), right)
    q = torch.div(v, div, rounding_mode="floor")
    r = v - q * div
    half = div // 2  # 0 when shift == 0: no rounding needed
    if rounding == "half_even":
        up = (r > half) | ((r == half) & (half > 0) & (q % 2 == 1))
    elif rounding == "half_up":
        up = (r >= half) & (half > 0)
    else:
        raise ValueError(f"rounding must be 'half_even' or 'half_up', got {rounding!r}")
    rounded = q + up.to(torch.int64)
    left = v * torch.pow(torch.tensor(2, dtype=torch.int64), (-shift).clamp_min(0))
    return torch.where(shift > 0, rounded, left)


def _quantize_float(x: torch.Tensor, fq: Pow2FakeQuantize) -> QTensor:
    """Codes of a float tensor exactly as the fake-quant op rounds them (float32, half to even)."""
    scale = fq.scale()
    codes = torch.round(x.float() * (1.0 / scale.reshape(()))).clamp(fq.quant_min, fq.quant_max)
    return QTensor(codes.to(torch.int64), torch.log2(scale.double()).round().to(torch.int64).reshape(()))


def _exp_of(fq: Pow2FakeQuantize) -> torch.Tensor:
    return torch.log2(fq.scale().double()).round().to(torch.int64)


class IntegerModel:
    """An interpreter of a prepared model's fx graph on integer tensors (see the module docstring)."""

    def __init__(self, prepared: fx.GraphModule, rounding: str = "half_even") -> None:
        if rounding not in ("half_even", "half_up"):
            raise ValueError(f"rounding must be 'half_even' or 'half_up', got {rounding!r}")
        self.gm, self.rounding = prepared, rounding
        self.float_ops: list[str] = []
        self.trace: dict[str, Any] = {}

    @classmethod
    def from_prepared(cls, prepared: fx.GraphModule, rounding: str = "half_even") -> "IntegerModel":
        """Wrap a prepared model (its quantizers must be calibrated; it is not modified)."""
        if not isinstance(prepared, fx.GraphModule):
            raise ValueError(f"{type(prepared).__name__}: expected a prepared fx GraphModule")
        return cls(prepared, rounding)

    # ---- ops -------------------------------------------------------------------------------------
    def requantize(self, x: Any, fq: Pow2FakeQuantize) -> Any:
        """Move codes (or a float tensor) onto ``fq``'s grid, saturating to its integer range."""
        if not (bool(fq.calibrated) and bool(fq.fake_quant_enabled)):
            return x
        if not isinstance(x, QTensor):
            return _quantize_float(x, fq)
        target = _exp_of(fq).reshape(())
        shift = (target - x.exp).reshape(1, -1, 1, 1) if x.exp.numel() > 1 else target - x.exp
        codes = shift_round(x.data, shift, self.rounding).clamp(fq.quant_min, fq.quant_max)
        return QTensor(codes, target)

    def conv(self, x: Any, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, wq: Pow2FakeQuantize,
             act: Optional[nn.Module], name: str) -> Any:
        """Integer conv: exact accumulation, int32 bias at s_in*s_w, ReLU/ReLU6 as clamps."""
        if not isinstance(x, QTensor) or x.exp.numel() != 1 or not bool(wq.calibrated):
            self.float_ops.append(name)
            w = wq(weight) if bool(wq.calibrated) else weight
            y = F.conv2d(_as_float(x), w, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            return act(y) if act is not None else y
        s_w = wq.scale().expand(weight.shape[0])
        codes = torch.round(weight.float() * (1.0 / s_w).reshape(-1, 1, 1, 1)).clamp(wq.quant_min, wq.quant_max)
        acc = F.conv2d(x.data.double(), codes.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
        _, b_codes = round_bias(bias, float(2.0 ** int(x.exp)), s_w)
        acc = acc.round().to(torch.int64) + b_codes.reshape(1, -1, 1, 1)
        exp = x.exp.reshape(()) + torch.log2(s_w.double()).round().to(torch.int64)
        if isinstance(act, nn.ReLU6):
            limit = torch.floor(6.0 * torch.pow(2.0, -exp.double())).to(torch.int64).reshape(1, -1, 1, 1)
            acc = torch.minimum(acc.clamp_min(0), limit)
        elif isinstance(act, nn.ReLU):
            acc = acc.clamp_min(0)
        elif act is not None and not isinstance(act, nn.Identity):
            raise ValueError(f"{name}: activation {type(act).__name__} has no integer form")
        return QTensor(acc, exp)

    def _fused(self, node: fx.Node, module: QATConvBnAct, x: Any) -> Any:
        weight, bias = module.folded_weight_and_bias()
        return self.conv(x, module.conv, weight, bias, module.weight_fake_quant, module.act, str(node.target))

    def _leaf(self, node: fx.Node, env: dict[str, Any]) -> list[Any]:
        outs = []
        for name, conv, arg in leaf_conv_inputs(self.gm, node):
            weight, bias = conv.folded_weight_and_bias()
            y = self.conv(env[arg.name], conv, weight, bias, conv.weight_fake_quant, None, name)
            out = conv.out_quant
            outs.append(self.requantize(y, out) if isinstance(out, Pow2FakeQuantize) else y)
        return outs

    def _grid_op(self, fn, x: Any, *args: Any, **kwargs: Any) -> Any:
        """max-pool / nearest resize / reshape on codes: the scale is unchanged."""
        if not isinstance(x, QTensor):
            return fn(x, *args, **kwargs)
        return QTensor(fn(x.data.double(), *args, **kwargs).round().to(torch.int64), x.exp)

    def _cat(self, tensors: list[Any], dim: int, name: str) -> Any:
        if all(isinstance(t, QTensor) and t.exp.numel() == 1 for t in tensors):
            exps = {int(t.exp) for t in tensors}
            if len(exps) == 1:
                return QTensor(torch.cat([t.data for t in tensors], dim), tensors[0].exp.reshape(()))
            LOGGER.warning("%s: concat of scales 2^%s; aligned by exact left shifts", name, sorted(exps))
            low = min(exps)
            return QTensor(torch.cat([t.data * 2 ** (int(t.exp) - low) for t in tensors], dim), torch.tensor(low))
        self.float_ops.append(name)
        return torch.cat([_as_float(t) for t in tensors], dim)

    def _add(self, a: Any, b: Any, name: str) -> Any:
        if isinstance(a, QTensor) and isinstance(b, QTensor) and a.exp.numel() == b.exp.numel() == 1:
            low = min(int(a.exp), int(b.exp))  # equal by construction (shared quantizer)
            return QTensor(a.data * 2 ** (int(a.exp) - low) + b.data * 2 ** (int(b.exp) - low), torch.tensor(low))
        self.float_ops.append(name)
        return _as_float(a) + _as_float(b)

    # ---- interpreter -----------------------------------------------------------------------------
    def _call_module(self, node: fx.Node, env: dict[str, Any]) -> Any:
        module = self.gm.get_submodule(str(node.target))
        arg = env.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        if isinstance(module, Pow2FakeQuantize):
            return self.requantize(arg, module)
        if isinstance(module, QATConvBnAct):
            return self._fused(node, module, arg)
        if any(isinstance(m, QATConv) for m in module.modules()) and not isinstance(module, QATConv):
            return self._leaf(node, env)
        if isinstance(module, (nn.MaxPool2d, nn.Upsample, nn.Identity, nn.Flatten)) and (
                not isinstance(module, nn.Upsample) or module.mode == "nearest"):
            return self._grid_op(module, arg)
        self.float_ops.append(str(node.target))
        return module(*_floats(node.args, env), **_floats(node.kwargs, env))

    def _call_function(self, node: fx.Node, env: dict[str, Any]) -> Any:
        target = node.target
        if target is torch.cat:
            tensors = [env[n.name] for n in node.args[0]]
            return self._cat(tensors, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), node.name)
        if target in (operator.add, torch.add) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            return self._add(env[node.args[0].name], env[node.args[1].name], node.name)
        if target in (F.max_pool2d, F.interpolate) and isinstance(env.get(node.args[0].name), QTensor):
            if target is F.max_pool2d or node.kwargs.get("mode", "nearest") == "nearest":
                rest = _floats(node.args[1:], env)
                return self._grid_op(target, env[node.args[0].name], *rest, **_floats(node.kwargs, env))
        args, kwargs = _floats(node.args, env), _floats(node.kwargs, env)
        if any(isinstance(a, torch.Tensor) for a in list(args) + list(kwargs.values())):
            self.float_ops.append(node.name)
        return target(*args, **kwargs)

    @torch.no_grad()
    def run(self, images: torch.Tensor, keep: bool = False) -> Any:
        """Run on ``images`` (uint8 NCHW, or float in [0, 1]); returns the graph output with QTensors
        for integer values (for a YOLO model: one QTensor of int8 codes per head level, NCHW).
        ``keep`` stores every node's value in :attr:`trace` (node name -> value)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        env: dict[str, Any] = {}
        self.float_ops, self.trace = [], {}
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = x if placeholders == 0 else (node.args[0] if node.args else None)
                placeholders += 1
            elif node.op == "get_attr":
                env[node.name] = _get_attr(self.gm, str(node.target))
            elif node.op == "call_module":
                env[node.name] = self._call_module(node, env)
            elif node.op == "call_function":
                env[node.name] = self._call_function(node, env)
            elif node.op == "call_method":
                self.float_ops.append(node.name)
                obj, *rest = _floats(node.args, env)
                env[node.name] = getattr(obj, node.target)(*rest, **_floats(node.kwargs, env))
            elif node.op == "output":
                return _map(node.args[0], env)
            if keep:
                self.trace[node.name] = env[node.name]
        return None


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _as_float(v: Any) -> Any:
    return v.dequantize() if isinstance(v, QTensor) else v


def _map(arg: Any, env: dict[str, Any]) -> Any:
    return fx.node.map_arg(arg, lambda n: env[n.name])


def _floats(arg: Any, env: dict[str, Any]) -> Any:
    """Node arguments with integer values dequantized (for ops that run in float)."""
    value = _map(arg, env)
    if isinstance(value, dict):
        return {k: _as_float(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float(v) if not isinstance(v, (list, tuple)) else [_as_float(u) for u in v]
                           for v in value)
    return _as_float(value)


class _Recorder(fx.Interpreter):
    """Runs the prepared (fake-quant) model, keeping the output of every quantizer node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_module" and isinstance(self.module.get_submodule(str(n.target)), Pow2FakeQuantize):
            self.values[n.name] = out
        return out


def _diff(q: QTensor, ref: torch.Tensor) -> dict[str, Any]:
    got = q.dequantize()
    step = torch.pow(2.0, q.exp.double()).float()
    diff = (got - ref.float()).abs() / step
    return {"values": diff.numel(), "exact": int((diff == 0).sum()), "max_steps": float(diff.max()) if diff.numel() else 0.0,
            "scale_exponent": int(q.exp)}


@torch.no_grad()
def compare_with_fake_quant(prepared: fx.GraphModule, images: torch.Tensor, rounding: str = "half_even") -> dict:
    """Run the integer reference and the fake-quant model (eval) on ``images`` (uint8 or [0,1] float NCHW).

    Returns: 'outputs' (per leaf output: values, exact, max_steps), totals 'values', 'exact',
    'exact_fraction', 'max_steps' over the outputs, 'layers' (the same per quantizer node, with
    the first node that differs in 'first_mismatch') and 'float_ops' (ops the reference ran in float).
    Differences are measured on dequantized values, in steps of the integer tensor's scale.
    """
    was_training = prepared.training
    prepared.eval()
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    head_refs: list[torch.Tensor] = []
    hooks = []
    for node in prepared.graph.nodes:
        module = prepared.get_submodule(str(node.target)) if node.op == "call_module" else None
        if module is not None and not isinstance(module, QATConv) and any(isinstance(m, QATConv) for m in module.modules()):
            for _, conv, _ in leaf_conv_inputs(prepared, node):
                hooks.append(conv.register_forward_hook(lambda m, a, out: head_refs.append(out)))
    try:
        recorder = _Recorder(prepared)
        recorder.run(x)
    finally:
        for h in hooks:
            h.remove()
        prepared.train(was_training)
    imodel = IntegerModel.from_prepared(prepared, rounding)
    result = imodel.run(images, keep=True)
    outs = [o for o in (result if isinstance(result, (list, tuple)) else [result]) if isinstance(o, QTensor)]
    outputs = [_diff(q, r) for q, r in zip(outs, head_refs)]
    layers = {name: _diff(imodel.trace[name], ref) for name, ref in recorder.values.items()
              if isinstance(imodel.trace.get(name), QTensor)}
    first = next((n for n, d in layers.items() if d["exact"] != d["values"]), None)
    total = sum(o["values"] for o in outputs)
    exact = sum(o["exact"] for o in outputs)
    return {"outputs": outputs, "values": total, "exact": exact, "exact_fraction": exact / max(total, 1),
            "max_steps": max((o["max_steps"] for o in outputs), default=0.0), "layers": layers,
            "first_mismatch": first, "float_ops": list(imodel.float_ops), "rounding": rounding}
