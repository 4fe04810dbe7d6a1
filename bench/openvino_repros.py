"""Minimal QDQ models on which OpenVINO's CPU plugin departs from the ONNX specification.

Usage:
    python -m bench.openvino_repros [--save DIR]

Each model is a few nodes with seeded random integer data and power-of-2 scales, built here (no
binary files). For each, the script prints the largest difference, in output quantization steps, of
onnxruntime (all graph optimisations) and, when the ``openvino`` package is installed, of OpenVINO (as
is, and with export.py --openvino-compat's guards where they apply: quant.qdq_onnx.openvino_guards)
against the model's reference: numpy doing what the ONNX operators specify (integer accumulation,
QuantizeLinear rounding half to even, saturation). onnxruntime matches it exactly on all three.

* ``bias_broadcast``: Conv (int32 bias, per-channel weights) -> QuantizeLinear -> DequantizeLinear
  -> Reshape whose target shape comes from a Shape of that same tensor, height/width free. OpenVINO
  2026.4.1 adds channel 0's bias to every channel. YOLO's head did this with free height/width;
  export.py now takes the head's sizes from the network input instead.
* ``residual_add``: Conv -> Relu -> QuantizeLinear -> DequantizeLinear -> Add(residual) ->
  QuantizeLinear. OpenVINO fuses the Add into the conv and rounds once, after the Add, skipping the
  conv branch's QuantizeLinear rounding: off by one step wherever that rounding meets a tie. The
  guard (an identity 1x1 MaxPool before the Add) makes it exact.
* ``int8_concat``: Concat of int8 tensors -> int8 QuantizeLinear/DequantizeLinear -> Conv. OpenVINO
  requantizes the concat as uint8 and the conv comes out off by many steps (uint8 concats, as in
  ReLU models, are right). The guard (an identity 1x1 MaxPool between Concat and QuantizeLinear)
  makes it exact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPSET = 17


def _q(x: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    """QuantizeLinear with zero point 0: round half to even, saturate."""
    return np.clip(np.rint(x / scale), lo, hi)


def _conv1x1(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x) + bias.reshape(1, -1, 1, 1)


def _qdq_conv(h: Any, nh: Any, x_in: str, x_scale: str, x_zero: str, w: np.ndarray, w_scale: np.ndarray,
              bias: np.ndarray, bias_scale: np.ndarray, out: str) -> tuple[list, list]:
    """DequantizeLinear(x), DequantizeLinear(int8 w, per channel), DequantizeLinear(int32 bias) -> Conv."""
    co = w.shape[0]
    inits = [nh.from_array(w, "w"), nh.from_array(w_scale, "w_scale"), nh.from_array(np.zeros(co, np.int8), "w_zero"),
             nh.from_array(bias, "b"), nh.from_array(bias_scale, "b_scale"),
             nh.from_array(np.zeros(co, np.int32), "b_zero")]
    nodes = [h.make_node("DequantizeLinear", [x_in, x_scale, x_zero], ["x_f"]),
             h.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_f"], axis=0),
             h.make_node("DequantizeLinear", ["b", "b_scale", "b_zero"], ["b_f"], axis=0),
             h.make_node("Conv", ["x_f", "w_f", "b_f"], [out])]
    return nodes, inits


def bias_broadcast(seed: int = 0) -> tuple[Any, dict, Callable[[dict], np.ndarray], float]:
    """(model, inputs, reference, output step) for the Shape -> Reshape case."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    rng = np.random.default_rng(seed)
    ci, co, sx, sw, sy = 8, 6, 2.0 ** -3, 2.0 ** -6, 2.0 ** -4
    w = rng.integers(-20, 21, (co, ci, 1, 1)).astype(np.int8)
    bias = np.array([-2000, 1500, -900, 300, 0, 2500], np.int32)
    nodes, inits = _qdq_conv(h, nh, "x", "x_scale", "x_zero", w, np.full(co, sw, np.float32), bias,
                             np.full(co, sx * sw, np.float32), "conv")
    inits += [nh.from_array(np.array(sx, np.float32), "x_scale"), nh.from_array(np.array(0, np.uint8), "x_zero"),
              nh.from_array(np.array(sy, np.float32), "y_scale"), nh.from_array(np.array(0, np.int8), "y_zero"),
              nh.from_array(np.array([0], np.int64), "i0"), nh.from_array(np.array([2], np.int64), "i2"),
              nh.from_array(np.array([3], np.int64), "i3"), nh.from_array(np.array([2, co // 2], np.int64), "split")]
    nodes += [h.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["y_q"]),
              h.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"]),
              h.make_node("Shape", ["y"], ["shape"]),
              h.make_node("Gather", ["shape", "i0"], ["n"]), h.make_node("Gather", ["shape", "i2"], ["hh"]),
              h.make_node("Gather", ["shape", "i3"], ["ww"]),
              h.make_node("Concat", ["n", "split", "hh", "ww"], ["target"], axis=0),
              h.make_node("Reshape", ["y", "target"], ["out"])]
    graph = h.make_graph(nodes, "bias_broadcast", [h.make_tensor_value_info("x", TP.UINT8, [1, ci, "h", "w"])],
                         [h.make_tensor_value_info("out", TP.FLOAT, [1, 2, co // 2, "h", "w"])], inits)
    inputs = {"x": rng.integers(0, 60, (1, ci, 4, 4)).astype(np.uint8)}

    def reference(feed: dict) -> np.ndarray:
        acc = _conv1x1(feed["x"].astype(np.float64) * sx, w.astype(np.float64) * sw, bias * sx * sw)
        y = _q(acc, sy, -128, 127) * sy
        return y.reshape(y.shape[0], 2, co // 2, *y.shape[2:])

    return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)]), inputs, reference, sy


def residual_add(seed: int = 0) -> tuple[Any, dict, Callable[[dict], np.ndarray], float]:
    """(model, inputs, reference, output step) for the conv + residual Add case."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    rng = np.random.default_rng(seed)
    c, sx, sm = 16, 2.0 ** -3, 2.0 ** -8  # a coarse weight step against a fine output step: many ties
    w = rng.integers(-2, 3, (c, c, 1, 1)).astype(np.int8)
    w_scale = (2.0 ** rng.integers(-7, -5, c)).astype(np.float32)
    bias = rng.integers(-20, 21, c).astype(np.int32)
    nodes, inits = _qdq_conv(h, nh, "x", "x_scale", "zero", w, w_scale, bias, (w_scale * sx).astype(np.float32),
                             "conv")
    inits += [nh.from_array(np.array(sx, np.float32), "x_scale"), nh.from_array(np.array(sm, np.float32), "s"),
              nh.from_array(np.array(0, np.uint8), "zero")]
    nodes += [h.make_node("Relu", ["conv"], ["relu"]),
              h.make_node("QuantizeLinear", ["relu", "s", "zero"], ["branch_q"]),
              h.make_node("DequantizeLinear", ["branch_q", "s", "zero"], ["branch"]),
              h.make_node("DequantizeLinear", ["residual", "s", "zero"], ["residual_f"]),
              h.make_node("Add", ["residual_f", "branch"], ["sum"]),
              h.make_node("QuantizeLinear", ["sum", "s", "zero"], ["out"])]
    shape = [1, c, 8, 8]
    graph = h.make_graph(nodes, "residual_add", [h.make_tensor_value_info("x", TP.UINT8, shape),
                                                 h.make_tensor_value_info("residual", TP.UINT8, shape)],
                         [h.make_tensor_value_info("out", TP.UINT8, shape)], inits)
    inputs = {"x": rng.integers(0, 4, shape).astype(np.uint8), "residual": rng.integers(0, 60, shape).astype(np.uint8)}

    def reference(feed: dict) -> np.ndarray:
        acc = _conv1x1(feed["x"].astype(np.float64) * sx, w.astype(np.float64) * w_scale.reshape(-1, 1, 1, 1),
                       bias * sx * w_scale.astype(np.float64))
        branch = _q(np.maximum(acc, 0), sm, 0, 255) * sm
        return _q(feed["residual"].astype(np.float64) * sm + branch, sm, 0, 255)

    return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)]), inputs, reference, 1.0


def int8_concat(seed: int = 0) -> tuple[Any, dict, Callable[[dict], np.ndarray], float]:
    """(model, inputs, reference, output step) for the int8 Concat -> conv case."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    rng = np.random.default_rng(seed)
    c, co, s, sw, sy = 8, 4, 2.0 ** -3, 2.0 ** -6, 2.0 ** -4
    w = rng.integers(-30, 31, (co, 2 * c, 1, 1)).astype(np.int8)
    bias = rng.integers(-500, 501, co).astype(np.int32)
    nodes, inits = _qdq_conv(h, nh, "cat_q", "s", "zero", w, np.full(co, sw, np.float32), bias,
                             np.full(co, s * sw, np.float32), "conv")
    inits += [nh.from_array(np.array(s, np.float32), "s"), nh.from_array(np.array(0, np.int8), "zero"),
              nh.from_array(np.array(sy, np.float32), "y_scale")]
    nodes = [h.make_node("DequantizeLinear", ["left", "s", "zero"], ["left_f"]),
             h.make_node("DequantizeLinear", ["right", "s", "zero"], ["right_f"]),
             h.make_node("Concat", ["left_f", "right_f"], ["cat"], axis=1),
             h.make_node("QuantizeLinear", ["cat", "s", "zero"], ["cat_q"])] + nodes
    nodes.append(h.make_node("QuantizeLinear", ["conv", "y_scale", "zero"], ["out"]))
    shape = [1, c, 6, 6]
    graph = h.make_graph(nodes, "int8_concat", [h.make_tensor_value_info(n, TP.INT8, shape) for n in ("left", "right")],
                         [h.make_tensor_value_info("out", TP.INT8, [1, co, *shape[2:]])], inits)
    inputs = {k: rng.integers(-128, 128, shape).astype(np.int8) for k in ("left", "right")}

    def reference(feed: dict) -> np.ndarray:
        cat = np.concatenate([feed["left"], feed["right"]], 1).astype(np.float64) * s
        return _q(_conv1x1(cat, w.astype(np.float64) * sw, bias * s * sw), sy, -128, 127)

    return h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)]), inputs, reference, 1.0


REPROS = {"bias_broadcast": bias_broadcast, "residual_add": residual_add, "int8_concat": int8_concat}


def steps_off(got: np.ndarray, want: np.ndarray, step: float) -> tuple[float, float]:
    """(largest difference in steps, fraction of values that differ)."""
    diff = np.abs(np.asarray(got, np.float64).reshape(want.shape) - want) / step
    return float(diff.max()), float((diff > 0).mean())


def _openvino(ov: Any, model: Any, inputs: dict) -> np.ndarray:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU")
    return compiled(inputs)[compiled.output(0)]


def run(save: str = "") -> dict[str, dict[str, tuple[float, float]]]:
    """Build every repro, run it, print the differences; returns {repro: {runtime: (max steps, fraction)}}."""
    import onnx
    import onnxruntime as ort

    from quant.qdq_onnx import openvino_guards
    from utils.export.onnx_backend import session_options

    try:
        import openvino as ov
    except ImportError:
        ov = None
        print("openvino: not installed, only onnxruntime runs (pip install openvino, in its own environment)")
    results = {}
    for name, build in REPROS.items():
        model, inputs, reference, step = build()
        onnx.checker.check_model(model)
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(Path(save) / f"{name}.onnx"))
        want = reference(inputs)
        session = ort.InferenceSession(model.SerializeToString(), session_options(ort),
                                       providers=["CPUExecutionProvider"])
        results[name] = {"onnxruntime": steps_off(session.run(None, inputs)[0], want, step)}
        if ov is not None:
            version = ov.__version__.split("-")[0]
            results[name][f"openvino {version}"] = steps_off(_openvino(ov, model, inputs), want, step)
            guarded = onnx.ModelProto()
            guarded.CopyFrom(model)
            if sum(openvino_guards(guarded).values()):
                results[name][f"openvino {version}, --openvino-compat guards"] = steps_off(
                    _openvino(ov, guarded, inputs), want, step)
        for runtime, (worst, share) in results[name].items():
            print(f"{name:15s} {runtime:44s} max {worst:g} steps off, {share:.1%} of values differ")
    return results


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", type=str, default="", help="folder to write the .onnx files to")
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "openvino_repros")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
