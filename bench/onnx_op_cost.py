"""What single onnxruntime ops cost on one head-sized tensor: the float decode's passes (Sigmoid, Mul,
Transpose, Concat), the INT8 file's extra ones (DequantizeLinear, an int8 Transpose), and a Gather from a
table indexed by the int8 codes (the lookup that would replace DequantizeLinear + Sigmoid + the box
arithmetic in an INT8 file).

Usage:
    python -m bench.onnx_op_cost                          # 1x3x80x80x85: one 640 px yolov5n head level
    python -m bench.onnx_op_cost --shape 1 3 40 40 85 --threads 2 --runs 200

Each op is a one-node model timed alone (median of ``runs`` after a warm-up); notes/qat_speed.md has the
table and what it decided.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import numpy as np

CODES = 256  # int8 codes per channel in the lookup table


def _model(node, inputs: list, output, initializers: tuple = ()) -> bytes:
    from onnx import helper

    graph = helper.make_graph([node], "op", inputs, [output], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _median_ms(model: bytes, feeds: dict, runs: int, threads: int) -> float:
    import onnxruntime as ort

    from utils.export.onnx_backend import session_options

    session = ort.InferenceSession(model, session_options(ort, threads), providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def run(shape: tuple[int, ...] = (1, 3, 80, 80, 85), runs: int = 200, threads: int = 2) -> dict[str, float]:
    from onnx import TensorProto, helper, numpy_helper

    def info(name: str, dtype: int, dims: tuple) -> object:
        return helper.make_tensor_value_info(name, dtype, list(dims))

    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, shape).astype(np.int8)
    values = codes.astype(np.float32) / 16
    channels = shape[-1]
    index = codes.astype(np.int64) + 128 + CODES * np.arange(channels)  # code + channel offset
    moved = tuple(shape[i] for i in (0, 2, 3, 1, 4))
    f32, i8 = info("x", TensorProto.FLOAT, shape), info("x", TensorProto.INT8, shape)
    out = info("y", TensorProto.FLOAT, shape)
    table = numpy_helper.from_array(rng.random(channels * CODES).astype(np.float32), "table")
    dq_params = (numpy_helper.from_array(np.array(1 / 16, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.int8), "z"))
    cases = {
        "Sigmoid (float)": (_model(helper.make_node("Sigmoid", ["x"], ["y"]), [f32], out), values),
        "Mul (float)": (_model(helper.make_node("Mul", ["x", "x"], ["y"]), [f32], out), values),
        "Transpose (float)": (_model(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1, 4]), [f32],
                                     info("y", TensorProto.FLOAT, moved)), values),
        "Concat of two (float)": (_model(helper.make_node("Concat", ["x", "x"], ["y"], axis=-1), [f32],
                                         info("y", TensorProto.FLOAT, shape[:-1] + (2 * channels,))), values),
        "DequantizeLinear (int8)": (_model(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"]), [i8], out,
                                           dq_params), codes),
        "Transpose (int8)": (_model(helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1, 4]), [i8],
                                    info("y", TensorProto.INT8, moved)), codes),
        "Gather from a per-channel code table": (_model(helper.make_node("Gather", ["table", "x"], ["y"], axis=0),
                                                        [info("x", TensorProto.INT64, shape)], out, (table,)), index),
    }
    rows = {name: _median_ms(model, {"x": x}, runs, threads) for name, (model, x) in cases.items()}
    print(f"onnx_op_cost: one {shape} tensor ({np.prod(shape) / 1e6:.2f} M values), {threads} threads, "
          f"median of {runs}")
    for name, ms in rows.items():
        print(f"  {name:<40}{ms:8.3f} ms")
    return rows


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", type=int, default=[1, 3, 80, 80, 85])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    run(tuple(o.shape), o.runs, o.threads)
