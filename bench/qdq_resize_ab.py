"""What keeping the upsample joins 8-bit buys in onnxruntime: the INT8 QDQ export as it is, against the
same file with the re-quantization after each Resize taken out (quant.qdq_onnx's requantize step undone),
timed side by side, with a check that both give the same outputs.

Usage:
    python -m bench.qdq_resize_ab --imgsz 320 640 --threads 2 --rounds 40
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import SHARED  # noqa: E402


def without_resize_requant(model: Any) -> Any:
    """A copy of ``model`` whose Resize outputs feed their readers directly again (no Q/DQ pair)."""
    import onnx

    from quant.qdq_onnx import REQUANT_SUFFIX

    out = onnx.ModelProto()
    out.CopyFrom(model)
    quantizers = {n.output[0]: n for n in out.graph.node if n.name.endswith(REQUANT_SUFFIX)}
    pairs = [(q, dq) for dq in out.graph.node if dq.op_type == "DequantizeLinear" and dq.input[0] in quantizers
             for q in [quantizers[dq.input[0]]]]
    for q, dq in pairs:
        for node in out.graph.node:
            for k, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[k] = q.input[0]
        out.graph.node.remove(q)
        out.graph.node.remove(dq)
    return out


def run(weights: Path = SHARED / "weights" / "yolov5n.pt", imgsz: tuple[int, ...] = (320, 640), threads: int = 2,
        rounds: int = 40, block: int = 5, raw_head: bool = False) -> list[dict]:
    import onnx

    from bench.int8_latency import build_pair
    from bench.onnx_latency import side_by_side

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in imgsz:
            fp32, int8 = build_pair(Path(weights), int(size), Path(tmp), raw_head=raw_head)
            before = Path(tmp) / f"int8_{size}_float_resize.onnx"
            onnx.save(without_resize_requant(onnx.load(str(int8))), str(before))
            ms, outputs = side_by_side({"fp32": fp32, "int8, float resize and concat": before, "int8, 8-bit": int8},
                                       int(size), threads, rounds, block)
            same = all(np.array_equal(p, q) for p, q in zip(outputs["int8, float resize and concat"],
                                                             outputs["int8, 8-bit"]))
            rows.append({"imgsz": size, **ms, "identical_outputs": same})
            print(f"{size} px: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f"; 8-bit / float resize {ms['int8, 8-bit'] / ms['int8, float resize and concat']:.3f}"
                  + f"; outputs identical: {same}")
    return rows


if __name__ == "__main__":
    from bench.onnx_latency import run_ab_cli

    run_ab_cli(run, __doc__)
