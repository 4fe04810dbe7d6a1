"""Time onnxruntime CPU inference of ONNX detectors: median latency per batch and images per second.

Usage:
    python -m bench.onnx_latency --onnx yolov5n.onnx [other.onnx ...] --iters 50 --threads 2 --json out.json

Each file runs on the same random input (its exported height/width unless --imgsz is given; its
static batch, else --batch-size). With several files the first is the baseline and the others get a
speed ratio against it (the INT8-vs-float comparison will use this).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("bench.onnx_latency")
ROOT = Path(__file__).resolve().parents[1]


def time_onnx(file: str | Path, batch_size: int = 1, imgsz: int | None = None, iters: int = 50,
              warmup: int = 5, threads: int = 0, exact_int8: bool = True) -> dict:
    """Median/mean ms per batch and images/s of one ONNX file on onnxruntime's CPU provider (``exact_int8``:
    see utils.export.onnx_backend.load_onnx_model)."""
    import numpy as np

    from utils.export.onnx_backend import load_onnx_model

    model, meta = load_onnx_model(file, "cpu", threads=threads, spin=True, exact_int8=exact_int8)
    if iters < 1 or warmup < 0:
        raise ValueError(f"--iters {iters} / --warmup {warmup}: need iters >= 1 and warmup >= 0")
    h, w = meta["imgsz"] if meta["imgsz"][0] and meta["imgsz"][1] else (640, 640)
    if meta["dynamic_hw"] and imgsz:
        h = w = imgsz
    batch = meta["batch"] if meta["batch"] != "dynamic" else batch_size
    x = np.random.default_rng(0).random((batch, 3, h, w), dtype=np.float32).astype(model.input_dtype)
    feed = {model.input_name: x}
    for _ in range(warmup):
        model.session.run(None, feed)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times)
    return {"file": str(file), "shape": [batch, 3, h, w], "threads": threads, "iters": iters,
            "median_ms": median, "mean_ms": statistics.fmean(times), "images_per_s": batch * 1e3 / median,
            "quant": meta["quant"]}


def run(onnx=(), batch_size=1, imgsz=None, iters=50, warmup=5, threads=0, json_out=None) -> list[dict]:
    """Time each file; log one line each (with the ratio to the first) and optionally write JSON."""
    rows = [time_onnx(f, batch_size, imgsz, iters, warmup, threads) for f in onnx]
    for row in rows:
        row["speedup_vs_first"] = rows[0]["median_ms"] / row["median_ms"]
        LOGGER.info("%-40s %s  median %.2f ms  mean %.2f ms  %.1f images/s  x%.2f vs first",
                    Path(row["file"]).name, tuple(row["shape"]), row["median_ms"], row["mean_ms"],
                    row["images_per_s"], row["speedup_vs_first"])
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))
    return rows


def side_by_side(files: dict[str, Path], imgsz: int, threads: int = 2, rounds: int = 40, block: int = 5,
                 settle: float | None = None, spin: bool = True) -> tuple[dict[str, float], dict[str, list]]:
    """({name: median ms}, {name: outputs}) of ``files`` run on one random (1, 3, imgsz, imgsz) image,
    timed in interleaved blocks of ``block`` runs (bench.qat_speed.interleave). Before each block it
    pauses ``settle`` seconds (default bench.qat_speed.ONNX_SETTLE_S): without the pause an idle session's
    spinning threads (``spin``) share the cores with the timed one, and INT8/FP32 at 320 px came out
    anywhere from 0.54 to 0.96 (notes/qat_speed.md)."""
    import numpy as np

    from bench.qat_speed import ONNX_SETTLE_S, Variant, interleave
    from utils.export.onnx_backend import load_onnx_model

    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    variants, outputs = [], {}
    for name, file in files.items():
        model, _ = load_onnx_model(file, "cpu", threads=threads, spin=spin)
        feed = {model.input_name: x.astype(model.input_dtype)}
        run_once = (lambda s, f: lambda: s.run(None, f))(model.session, feed)
        for _ in range(5):
            outputs[name] = run_once()
        variants.append(Variant(name, name, run_once))
    interleave(variants, rounds, block, settle=ONNX_SETTLE_S if settle is None else settle)
    return {v.name: v.median_ms for v in variants}, outputs


def run_ab_cli(run, doc: str, argv=None) -> list[dict]:
    """Command line of the side-by-side export benches (bench.int8_layout, bench.qdq_resize_ab):
    ``run(weights, imgsz, threads, rounds, raw_head=...)`` with the parsed options."""
    shared = Path(os.environ.get("YQ_SHARED", ROOT.parent / "shared"))
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--weights", type=str, default=str(shared / "weights" / "yolov5n.pt"))
    p.add_argument("--imgsz", nargs="+", type=int, default=[320, 640])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--raw-head", action="store_true", help="export the raw head maps (export.py --raw-head)")
    o = p.parse_args(argv)
    return run(Path(o.weights), tuple(o.imgsz), o.threads, o.rounds, raw_head=o.raw_head)


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", nargs="+", required=True, help="ONNX file(s); the first is the baseline")
    parser.add_argument("--batch-size", type=int, default=1, help="batch for dynamic-batch files")
    parser.add_argument("--imgsz", type=int, default=None, help="square size for dynamic-size files (640)")
    parser.add_argument("--iters", type=int, default=50, help="timed runs")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows as JSON here")
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "onnx_latency")


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # run as a file (python bench/onnx_latency.py): find the packages
        sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
