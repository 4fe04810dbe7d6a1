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

    def rewrite_init(self, name: str, array: np.ndarray, new_name: str) -> str:
        """Give the one reader of initializer ``name`` the value ``array``: in place when nothing else reads
        it (so the name the ranges JSON records stays valid), else as a new initializer ``new_name``."""
        if name in self.inits and len(self.users(name)) == 1:
            self.inits[name].CopyFrom(self._nh.from_array(array, name))
            return name
        return self.add_init(array, new_name)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def _fold_weight_quantizers(g: _Graph) -> int:
    """QuantizeLinear(float initializer) -> int8 initializer read directly by the DequantizeLinear, with
    a zero point of its own: the exporter shares equal constants between layers, and onnxruntime's exact
    8-bit mode (utils.export.onnx_backend.EXACT_INT8_CONFIG) rewrites each conv's weight zero point, which
    fails when two convs share it ('Attempt to replace the existing tensor', onnxruntime 1.32)."""
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
            if user.op_type == "DequantizeLinear" and len(user.input) > 2:
                user.input[2] = g.add_init(zero.copy(), f"{node.input[0]}_zero_point")
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
        src = g.producer.get(node.input[0])
        users = g.users(node.output[0])
        if _attr(node, "mode", b"nearest") != b"nearest" or src is None or src.op_type != "DequantizeLinear" or not users \
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


# onnxruntime's x86 integer convs are fast when the output channels are a multiple of 16: 64 -> 255 channels
# (the COCO head) at 80x80 took 1.40 ms against 0.79 ms for 64 -> 256 (notes/qat_speed.md, fifth round).
CHANNEL_BLOCK = 16


def _pad_rows(values: np.ndarray, extra: int, fill_like_last: bool) -> np.ndarray:
    """``values`` with ``extra`` rows appended along axis 0: copies of the last row (scales, so they stay
    powers of two) or zeros (weights, biases, zero points)."""
    tail = np.repeat(values[-1:], extra, axis=0) if fill_like_last else np.zeros((extra, *values.shape[1:]), values.dtype)
    return np.concatenate([values, tail])


def _pad_output_channels(g: _Graph, block: int = CHANNEL_BLOCK) -> int:
    """Conv -> QuantizeLinear -> DequantizeLinear with an output channel count that is not a multiple of
    ``block`` (the detection head's 3 * (nc + 5)) gets zero output channels up to the next multiple and a
    Slice after the DequantizeLinear that keeps the real ones. The added channels have zero weights and
    bias and are dropped before anything reads them, so no value changes."""
    import onnx

    done = 0
    for conv in [n for n in g.graph.node if n.op_type == "Conv"]:
        w_dq, b_dq = g.producer.get(conv.input[1]), g.producer.get(conv.input[2]) if len(conv.input) > 2 else None
        q_users = g.users(conv.output[0])
        if not (w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in g.inits
                and len(q_users) == 1 and q_users[0].op_type == "QuantizeLinear"):
            continue
        dq_users = g.users(q_users[0].output[0])
        if len(dq_users) != 1 or dq_users[0].op_type != "DequantizeLinear" or _attr(conv, "group", 1) != 1:
            continue
        channels = g.value(w_dq.input[0]).shape[0]
        extra = -channels % block
        if not extra:
            continue
        for node in ([w_dq, b_dq] if b_dq is not None and b_dq.op_type == "DequantizeLinear" else [w_dq]):
            for k, fill_like_last in ((0, False), (1, True), (2, False)):
                value = g.value(node.input[k])
                if value.ndim == 0:  # a per-tensor scale or zero point covers the new channels too
                    continue
                node.input[k] = g.rewrite_init(node.input[k], _pad_rows(value, extra, fill_like_last),
                                               f"{node.input[k]}_padded{block}")
        dq = dq_users[0]
        kept = dq.output[0]
        dq.output[0] = f"{kept}_padded{block}"
        bounds = [g.add_init(np.array([v], np.int64), f"{conv.name}_keep_channels_{tag}")
                  for tag, v in (("starts", 0), ("ends", channels), ("axes", 1))]
        keep = onnx.helper.make_node("Slice", [dq.output[0], *bounds], [kept], name=f"{conv.name}_keep_channels")
        g.graph.node.insert(list(g.graph.node).index(dq) + 1, keep)
        done += 1
    return done


def _space_to_depth_stem(g: _Graph) -> int:
    """The first conv, when it reads the quantized image with an even kernel 2m, stride 2 and even pads
    (YOLOv5's 6x6 stride-2 stem), becomes SpaceToDepth(2) on the 8-bit image followed by an m x m stride-1
    conv over 4x the channels with the same weights rearranged: the same sums term by term. onnxruntime's
    integer kernels are slow on 3 input channels (slower than its float conv); on 12 they are not."""
    import onnx

    image = g.graph.input[0].name if g.graph.input else None
    quants = [n for n in g.users(image) if n.op_type == "QuantizeLinear"] if image else []
    dqs = g.users(quants[0].output[0]) if len(quants) == 1 else []
    convs = g.users(dqs[0].output[0]) if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" else []
    if len(convs) != 1 or convs[0].op_type != "Conv":
        return 0
    conv, dq = convs[0], dqs[0]
    w_dq = g.producer.get(conv.input[1])
    kernel, strides, pads = _attr(conv, "kernel_shape"), _attr(conv, "strides"), _attr(conv, "pads", [0, 0, 0, 0])
    if not (w_dq is not None and w_dq.op_type == "DequantizeLinear" and w_dq.input[0] in g.inits
            and kernel and len(kernel) == 2 and all(k % 2 == 0 for k in kernel) and strides == [2, 2]
            and all(p % 2 == 0 for p in pads) and _attr(conv, "dilations", [1, 1]) == [1, 1]
            and _attr(conv, "group", 1) == 1 and _attr(conv, "auto_pad", b"NOTSET") == b"NOTSET"):
        return 0
    w = g.value(w_dq.input[0])
    out_c, in_c, kh, kw = w.shape
    # input row 2*i - p + 2*b + r (r = 0, 1) is row r of block i - p/2 + b; SpaceToDepth puts (r, c, channel)
    # at channel (2 * r + c) * in_c + channel
    blocks = w.reshape(out_c, in_c, kh // 2, 2, kw // 2, 2).transpose(0, 3, 5, 1, 2, 4)
    w_dq.input[0] = g.rewrite_init(w_dq.input[0], np.ascontiguousarray(blocks.reshape(out_c, 4 * in_c, kh // 2, kw // 2)),
                                   f"{w_dq.input[0]}_space_to_depth")
    s2d = onnx.helper.make_node("SpaceToDepth", [dq.input[0]], [f"{dq.input[0]}_space_to_depth"],
                                name=f"{conv.name}_space_to_depth", blocksize=2)
    g.graph.node.insert(list(g.graph.node).index(dq), s2d)
    dq.input[0] = s2d.output[0]
    for a in conv.attribute:
        if a.name == "kernel_shape":
            a.ints[:] = [kh // 2, kw // 2]
        elif a.name == "strides":
            a.ints[:] = [1, 1]
        elif a.name == "pads":
            a.ints[:] = [p // 2 for p in pads]
    return 1


def _drop_unused_initializers(g: _Graph) -> None:
    """Remove initializers nothing reads, and the exporter's Identity copies of constants that nothing
    reads any more."""
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in g.graph.node for i in n.input} | outputs
        dead = [n for n in g.graph.node if n.op_type == "Identity" and not (set(n.output) & used)]
        if not dead:
            break
        for node in dead:
            g.graph.node.remove(node)
    for init in [i for i in g.graph.initializer if i.name not in used]:
        g.graph.initializer.remove(init)


def finalize_qdq_onnx(model: Any, kernel_layout: bool = True) -> Any:
    """Store quantized weights as int8 (uint8) initializers and conv biases as int32 + DequantizeLinear,
    and keep nearest resizes of quantized tensors 8-bit (:func:`_requantize_resizes`). With
    ``kernel_layout`` also pad the head convs' output channels to a multiple of 16
    (:func:`_pad_output_channels`) and run a 6x6 stride-2 stem as SpaceToDepth + 3x3 conv
    (:func:`_space_to_depth_stem`): exact rewrites that onnxruntime's integer kernels run faster
    (export.py --plain-qdq leaves them out, for toolchains without SpaceToDepth).

    ``model`` is an onnx ModelProto, changed in place and returned.
    """
    g = _Graph(model)
    n_w = _fold_weight_quantizers(g)
    g = _Graph(model)
    n_b = _quantize_biases(g)
    n_r = _requantize_resizes(g)
    n_p = _pad_output_channels(_Graph(model)) if kernel_layout else 0
    n_s = _space_to_depth_stem(_Graph(model)) if kernel_layout else 0
    _drop_unused_initializers(g)
    LOGGER.info("QDQ ONNX: %d weights stored as integers, %d int32 biases, %d resizes kept 8-bit, %d convs padded "
                "to %d output channels, %d space-to-depth stem", n_w, n_b, n_r, n_p, CHANNEL_BLOCK, n_s)
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
_GRID_KEEPING = ("MaxPool", "Resize", "Identity", "Reshape", "Transpose", "Flatten", "Slice", "SpaceToDepth")


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
