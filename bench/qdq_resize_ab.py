"""What keeping the upsample joins 8-bit buys in onnxruntime: the INT8 QDQ export as it is, against the
same file with the re-quantization after each Resize taken out (quant.qdq_onnx's requantize step undone),
timed side by side, with a check that both give the same outputs.

Usage:
    python -m bench.qdq_resize_ab --imgsz 320 640 --threads 2 --rounds 40
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import ONNX_SETTLE_S, SHARED, Variant, interleave  # noqa: E402


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
        rounds: int = 40, block: int = 5) -> list[dict]:
    import onnx

    from bench.int8_latency import build_pair
    from utils.export.onnx_backend import load_onnx_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in imgsz:
            fp32, int8 = build_pair(Path(weights), int(size), Path(tmp))
            before = Path(tmp) / f"int8_{size}_float_resize.onnx"
            onnx.save(without_resize_requant(onnx.load(str(int8))), str(before))
            x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
            variants, sessions = [], {}
            for name, file in (("fp32", fp32), ("int8, float resize and concat", before), ("int8, 8-bit", int8)):
                model, _ = load_onnx_model(file, "cpu", threads=threads, spin=True)
                feed = {model.input_name: x.astype(model.input_dtype)}
                sessions[name] = (model.session, feed)
                run_once = (lambda s, f: lambda: s.run(None, f))(model.session, feed)
                for _ in range(5):
                    run_once()
                variants.append(Variant(name, name, run_once))
            interleave(variants, rounds, block, settle=ONNX_SETTLE_S)
            ms = {v.name: v.median_ms for v in variants}
            (a, fa), (b, fb) = sessions["int8, float resize and concat"], sessions["int8, 8-bit"]
            same = all(np.array_equal(p, q) for p, q in zip(a.run(None, fa), b.run(None, fb)))
            rows.append({"imgsz": size, **ms, "identical_outputs": same})
            print(f"{size} px: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + f"; 8-bit / float resize {ms['int8, 8-bit'] / ms['int8, float resize and concat']:.3f}"
                  + f"; outputs identical: {same}")
    return rows


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=str, default=str(SHARED / "weights" / "yolov5n.pt"))
    p.add_argument("--imgsz", nargs="+", type=int, default=[320, 640])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    run(Path(o.weights), tuple(o.imgsz), o.threads, o.rounds)
