"""ONNX side of the QDQ export: integer initializers, int32 biases, and the file's invariants.

Works on the onnx ModelProto that torch's TorchScript-based exporter writes from
:func:`quant.export.convert_for_export`'s module: weights arrive as QuantizeLinear(float
initializer) -> DequantizeLinear and conv biases as float initializers.

Example:
    >>> finalize_qdq_onnx(onnx_model); check_qdq_structure(onnx_model)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

__all__ = ["activation_tensor_names", "check_qdq_structure", "finalize_qdq_onnx", "openvino_guards",
           "output_steps", "read_steps"]

LOGGER = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- ONNX post-pass
class _Graph:
    """Small index over an onnx GraphProto: constant values and producers/consumers of tensors."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model, self.graph, self._nh = model, model.graph, numpy_helper
        self.inits = {i.name: i for i in self.graph.initializer}
        self.consts = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in self.graph.node for o in n.output}

    def value(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return self._nh.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is None:
            src = self.producer.get(name)  # the exporter shares equal constants through Identity nodes
            return self.value(src.input[0]) if src is not None and src.op_type == "Identity" else None
        for attr in node.attribute:
            if attr.name == "value":
                return self._nh.to_array(attr.t)
        return None

    def users(self, name: str) -> list:
        return [n for n in self.graph.node if name in n.input]

    def add_init(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(self._nh.from_array(array, name))
        self.inits[name] = self.graph.initializer[-1]
        return name


def _fold_weight_quantizers(g: _Graph) -> int:
    """QuantizeLinear(float initializer) -> int8 initializer read directly by the DequantizeLinear."""
    done = 0
    for node in [n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in g.inits]:
        w, scale, zero = g.value(node.input[0]), g.value(node.input[1]), g.value(node.input[2])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        codes = np.rint(w.astype(np.float64) / scale.astype(np.float64).reshape(shape)) + zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        name = g.add_init(np.clip(codes, info.min, info.max).astype(zero.dtype), f"{node.input[0]}_quantized")
        for user in g.users(node.output[0]):
            user.input[list(user.input).index(node.output[0])] = name
        g.graph.node.remove(node)
        done += 1
    return done


def _quantize_biases(g: _Graph) -> int:
    """Conv(DQ(x), DQ(w), float bias) -> bias as int32 + DequantizeLinear at scale s_in * s_w."""
    import onnx

    done = 0
    for node in [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in g.inits]:
        x_dq, w_dq = g.producer.get(node.input[0]), g.producer.get(node.input[1])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        s_in, s_w = g.value(x_dq.input[1]), g.value(w_dq.input[1])
        bias = g.value(node.input[2])
        if s_in is None or s_w is None or s_in.size != 1:
            continue
        step = float(s_in.reshape(())) * s_w.astype(np.float64).reshape(-1) * np.ones(bias.shape)
        codes = np.rint(bias.astype(np.float64) / step)
        if np.abs(codes).max(initial=0) > 2 ** 31 - 1 or np.abs(codes * step - bias).max(initial=0) > 1e-6 * (
                1 + np.abs(bias).max(initial=0)):
            raise ValueError(f"{node.name}: bias is not on the int32 grid s_in*s_w (convert_for_export rounds it)")
        base = node.input[2]
        q = g.add_init(codes.astype(np.int32), f"{base}_quantized")
        s = g.add_init(step.astype(np.float32), f"{base}_scale")
        z = g.add_init(np.zeros(bias.shape, np.int32), f"{base}_zero_point")
        dq = onnx.helper.make_node("DequantizeLinear", [q, s, z], [f"{base}_dequantized"], name=f"{node.name}_bias_dq",
                                   axis=0)
        g.graph.node.insert(list(g.graph.node).index(node), dq)
        node.input[2] = dq.output[0]
        done += 1
    return done


# Name suffix of the QuantizeLinear nodes _requantize_resizes adds: they re-state a grid the tensor is
# already on, so they belong to no quantizer module (activation_tensor_names skips them).
REQUANT_SUFFIX = "_on_grid_q"


def _requantize_resizes(g: _Graph) -> int:
    """DequantizeLinear -> Resize(nearest) -> X becomes DQ -> Resize -> QuantizeLinear -> DQ -> X, with the
    input's scale and zero point: nearest resizing copies values, so they are still on that grid and the
    pair changes no value. onnxruntime then resizes the 8-bit tensor and the concat that follows runs as
    QLinearConcat, instead of both in float at the upsampled size with a QuantizeLinear after them."""
    import onnx

    done = 0
    for node in [n for n in g.graph.node if n.op_type == "Resize"]:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        src = g.producer.get(node.input[0])
        users = g.users(node.output[0])
        if mode != "nearest" or src is None or src.op_type != "DequantizeLinear" or not users \
                or any(u.op_type == "QuantizeLinear" for u in users):
            continue
        out = node.output[0]
        q = onnx.helper.make_node("QuantizeLinear", [out, *src.input[1:]], [f"{out}_quantized"],
                                  name=f"{node.name}{REQUANT_SUFFIX}")
        dq = onnx.helper.make_node("DequantizeLinear", [q.output[0], *src.input[1:]], [f"{out}_dequantized"],
                                   name=f"{node.name}_on_grid_dq")
        at = list(g.graph.node).index(node) + 1
        g.graph.node.insert(at, dq)
        g.graph.node.insert(at, q)
        for user in users:
            for k, name in enumerate(user.input):
                if name == out:
                    user.input[k] = dq.output[0]
        done += 1
    return done


def _drop_unused_initializers(g: _Graph) -> None:
    used = {i for n in g.graph.node for i in n.input} | {o.name for o in g.graph.output}
    for init in [i for i in g.graph.initializer if i.name not in used]:
        g.graph.initializer.remove(init)


def finalize_qdq_onnx(model: Any) -> Any:
    """Store quantized weights as int8 (uint8) initializers and conv biases as int32 + DequantizeLinear,
    and keep nearest resizes of quantized tensors 8-bit (:func:`_requantize_resizes`).

    ``model`` is an onnx ModelProto, changed in place and returned.
    """
    g = _Graph(model)
    n_w = _fold_weight_quantizers(g)
    g = _Graph(model)
    n_b = _quantize_biases(g)
    n_r = _requantize_resizes(g)
    _drop_unused_initializers(g)
    LOGGER.info("QDQ ONNX: %d weights stored as integers, %d int32 biases, %d resizes kept 8-bit", n_w, n_b, n_r)
    return model


def _ranks(model: Any) -> dict[str, int]:
    """Rank of every tensor onnx's shape inference can tell (dimensions may stay symbolic)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


def _requantized(g: _Graph, tensor: str) -> bool:
    """True when ``tensor`` is DequantizeLinear(QuantizeLinear(...)) with one reader."""
    dq = g.producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or len(g.users(tensor)) != 1:
        return False
    q = g.producer.get(dq.input[0])
    return q is not None and q.op_type == "QuantizeLinear"


def openvino_guards(model: Any) -> dict[str, int]:
    """Put an identity 1x1 MaxPool where OpenVINO 2026.4's CPU plugin would otherwise compute a QDQ
    graph differently from the ONNX specification (which onnxruntime follows); returns how many of each.
    ``model`` is changed in place; every output stays bit for bit the same in onnxruntime.

    * ``residual_adds``: before an Add input that is a requantized tensor read by that Add alone (the
      conv branch of a residual block). OpenVINO fuses ``Conv -> ... -> QuantizeLinear ->
      DequantizeLinear -> Add -> QuantizeLinear`` into the conv and rounds once, after the Add,
      skipping the branch's own rounding (half to even): one step off wherever that rounding meets a
      tie, and power-of-2 scales make ties common. A pooling node cannot join the conv's fused
      post-ops, so the Add runs on the rounded values.
    * ``int8_concats``: between a Concat and its int8 QuantizeLinear. OpenVINO otherwise moves that
      requantization ahead of the Concat as uint8 and the next conv comes out many steps off (uint8
      concats, as after ReLU, are computed right and left alone).

    onnxruntime still runs every conv and residual Add of a ReLU model on integer kernels.
    """
    import onnx

    g, ranks = _Graph(model), _ranks(model)
    done = {"residual_adds": 0, "int8_concats": 0}

    def guard(tensor: str, reader: Any, index: int, kind: str) -> None:
        rank = ranks.get(tensor, 0)
        if rank < 3:  # MaxPool needs (N, C, spatial...)
            return
        pool = onnx.helper.make_node("MaxPool", [tensor], [f"{tensor}_guarded"], name=f"{reader.name}_guard{index}",
                                     kernel_shape=[1] * (rank - 2))
        g.graph.node.insert(list(g.graph.node).index(reader), pool)
        reader.input[index] = pool.output[0]
        done[kind] += 1

    for node in list(g.graph.node):
        if node.op_type == "Add":
            for k, tensor in enumerate(list(node.input)):
                if _requantized(g, tensor):
                    guard(tensor, node, k, "residual_adds")
        elif node.op_type == "QuantizeLinear" and len(node.input) > 2:
            src, zero = g.producer.get(node.input[0]), g.value(node.input[2])
            if src is not None and src.op_type == "Concat" and zero is not None and zero.dtype == np.int8:
                guard(node.input[0], node, 0, "int8_concats")
    LOGGER.info("QDQ ONNX: 1x1 MaxPool guards for OpenVINO: %d residual Add inputs, %d int8 concats",
                done["residual_adds"], done["int8_concats"])
    return done


def activation_tensor_names(model: Any, calls: list[str], scales: dict[str, float]) -> dict[str, list[dict[str, str]]]:
    """{quantizer module: [{'float': input tensor, 'quantized': QuantizeLinear output}, ...]}.

    Pairs the file's activation QuantizeLinear nodes (graph order) with ``calls``; refuses when the
    counts or the scales disagree, which would mean the exporter reordered them.
    """
    g = _Graph(model)
    nodes = [n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in g.inits
             and not n.name.endswith(REQUANT_SUFFIX)]
    if len(nodes) != len(calls):
        raise ValueError(f"ONNX has {len(nodes)} activation QuantizeLinear nodes but {len(calls)} quantizer calls "
                         "were traced; cannot name its tensors")
    names: dict[str, list[dict[str, str]]] = {}
    for node, module in zip(nodes, calls):
        scale = float(g.value(node.input[1]).reshape(()))
        if scale != scales[module]:
            raise ValueError(f"{node.name}: scale {scale} differs from {module}'s {scales[module]}; "
                             "QuantizeLinear order does not follow the trace")
        names.setdefault(module, []).append({"float": node.input[0], "quantized": node.output[0]})
    return names


# ---------------------------------------------------------------------------------- structural checks
_GRID_KEEPING = ("MaxPool", "Resize", "Identity", "Reshape", "Transpose", "Flatten")


def _is_pow2(values: np.ndarray) -> bool:
    v = values.astype(np.float64).reshape(-1)
    if not (v > 0).all():
        return False
    mant, _ = np.frexp(v)
    return bool((mant == 0.5).all())


def _source_dq(g: _Graph, tensor: str) -> Optional[Any]:
    node = g.producer.get(tensor)
    while node is not None and node.op_type in _GRID_KEEPING:
        node = g.producer.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def check_qdq_structure(model: Any) -> dict[str, Any]:
    """Assert the invariants of a power-of-2 QDQ file; returns a summary (counts, dtypes).

    Every Q/DQ scale is an exact power of two (int32 bias scales s_in*s_w included), every zero
    point is 0, every Concat of quantized tensors reads inputs of one scale (through MaxPool/Resize/reshapes);
    concats of float tensors only (box decoding) are skipped.
    Raises ValueError naming the first offending node.
    """
    g = _Graph(model)
    dtypes: dict[str, int] = {}
    n_q = n_dq = 0
    for node in g.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        n_q += node.op_type == "QuantizeLinear"
        n_dq += node.op_type == "DequantizeLinear"
        scale, zero = g.value(node.input[1]), g.value(node.input[2]) if len(node.input) > 2 else None
        if scale is None or not _is_pow2(scale):
            raise ValueError(f"{node.name}: scale {scale} is not an exact power of two")
        if zero is None or zero.any():
            raise ValueError(f"{node.name}: zero point {zero} is not 0")
        dtypes[str(zero.dtype)] = dtypes.get(str(zero.dtype), 0) + 1
    concats = 0
    for node in (n for n in g.graph.node if n.op_type == "Concat"):
        sources = [_source_dq(g, tensor) for tensor in node.input]
        if all(dq is None for dq in sources):
            continue  # float post-processing (box decoding)
        if any(dq is None for dq in sources):
            raise ValueError(f"{node.name}: joins quantized and float inputs {list(node.input)}")
        scales = [float(g.value(dq.input[1]).reshape(())) for dq in sources]
        if len(set(scales)) != 1:
            raise ValueError(f"{node.name}: inputs have different scales {scales}")
        concats += 1
    return {"quantize": n_q, "dequantize": n_dq, "zero_point_dtypes": dtypes, "aligned_concats": concats}


def read_steps(model: Any, tensors: list[str]) -> list[Optional[float]]:
    """Quantization step of each tensor: the scale of the DequantizeLinear it is read through
    (MaxPool/Resize/reshapes), or None for a tensor computed in float after its last DequantizeLinear."""
    g = _Graph(model)
    steps = []
    for name in tensors:
        dq = _source_dq(g, name)
        steps.append(None if dq is None else float(g.value(dq.input[1]).reshape(-1)[0]))
    return steps


def output_steps(model: Any) -> list[Optional[float]]:
    """:func:`read_steps` of every graph output."""
    return read_steps(model, [out.name for out in model.graph.output])
