"""INT8 QDQ vs FP32 ONNX latency in onnxruntime (CPU), same input, same session options.

Usage:
    python -m bench.int8_latency --weights ../shared/weights/yolov5n.pt --imgsz 320 640 --json int8.json
    python -m bench.int8_latency --imgsz 640 --threads 2 --profile     # + ms per op type in each file

For each size: the float model (rebuilt with ReLU, as QAT models are) and its PTQ-calibrated
power-of-2 QAT twin (a few coco128 images; accuracy is irrelevant for latency) are exported with
export.py's library path, then timed with bench.onnx_latency.time_onnx. Prints both medians and
the FP32/INT8 ratio (> 1: INT8 is faster), and the INT8 file's median with onnxruntime's default 8-bit
kernels (what the exact mode every project session sets costs on this CPU; nothing on CPUs with VNNI),
and writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

LOGGER = logging.getLogger("bench.int8_latency")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YQ_SHARED", ROOT.parent / "shared"))


def _calibration_batch(imgsz: int, n: int):
    import torch

    from utils.export.onnx_check import sample_batch

    images = sorted((SHARED / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:n]
    return (sample_batch(images, max(len(images), 1), (imgsz, imgsz)) * 255).round().to(torch.uint8)


def build_pair(weights: Path, imgsz: int, folder: Path, act: str = "relu", calib: int = 8,
               plain_qdq: bool = False, raw_head: bool = False) -> tuple[Path, Path]:
    """(fp32 .onnx, int8 QDQ .onnx) of ``weights`` rebuilt with ``act``, exported at ``imgsz`` (the QDQ file
    without the kernel-layout rewrites with ``plain_qdq``, as export.py --plain-qdq; both with the raw head
    maps as outputs with ``raw_head``, as export.py --raw-head)."""
    from quant.calibrate import calibrate
    from utils.checkpoint import make_checkpoint, save_checkpoint
    from utils.export.job import export_weights
    from utils.qat import load_model
    from utils.qat import prepare_qat_model, qat_checkpoint_entry

    model, _ = load_model(weights, act=act)
    fp32_pt, int8_pt = folder / f"fp32_{imgsz}.pt", folder / f"int8_{imgsz}.pt"
    save_checkpoint(make_checkpoint(model), fp32_pt)
    prepared = prepare_qat_model(model, imgsz)
    calibrate(prepared, [_calibration_batch(imgsz, calib)], calib)
    save_checkpoint(make_checkpoint(prepared, quant=qat_checkpoint_entry(prepared)), int8_pt)
    fp32 = export_weights(fp32_pt, imgsz=imgsz, check_images=[], raw_head=raw_head).file
    int8 = export_weights(int8_pt, imgsz=imgsz, check_images=[], plain_qdq=plain_qdq, raw_head=raw_head).file
    return fp32, int8


def op_type_ms(file: Path, runs: int = 30, warmup: int = 5, threads: int = 0, exact_int8: bool = True) -> dict[str, float]:
    """onnxruntime's per-node profile of ``file`` summed per op type: ms per run over ``runs`` runs after
    ``warmup`` left out (one image of the model's size, random values). Says whether the integer convs
    themselves are cheaper than the float ones on this CPU, whatever the rest of the graph costs."""
    import collections

    import numpy as np
    import onnxruntime as ort

    from utils.export.onnx_backend import parse_metadata, session_options

    options = session_options(ort, threads, exact_int8=exact_int8)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(file).with_suffix("")) + ("_exact" if exact_int8 else "_default")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    meta = parse_metadata(dict(session.get_modelmeta().custom_metadata_map), list(spec.shape),
                          [list(o.shape) for o in session.get_outputs()], source=str(file))
    x = np.random.default_rng(0).random((1, 3, *meta["imgsz"]), dtype=np.float32)
    feed = {spec.name: (x * 255).astype(np.uint8) if "uint8" in spec.type else x}
    warmup = max(warmup, 1)  # a session's first run is its own warm-up
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    timed_from = sorted(e["ts"] for e in events if e.get("name") == "model_run")[warmup]
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_op.most_common())


def log_op_types(fp32: Path, int8: Path, runs: int, threads: int) -> dict[str, dict[str, float]]:
    """The per-op-type profile of the FP32 file, the INT8 file with exact kernels and with onnxruntime's
    default ones; logs the convs' share and ratio."""
    profiles = {"fp32": op_type_ms(fp32, runs, threads=threads), "int8_exact": op_type_ms(int8, runs, threads=threads),
                "int8_default_kernels": op_type_ms(int8, runs, threads=threads, exact_int8=False)}
    float_conv = profiles["fp32"].get("Conv", 0.0)
    for name, ops in profiles.items():
        conv = ops.get("Conv", 0.0) if name == "fp32" else ops.get("QLinearConv", 0.0)
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:6])
        LOGGER.info("  profile %-20s all nodes %.2f ms, convs %.2f ms (x%.2f the float convs); %s", name,
                    sum(ops.values()), conv, conv / float_conv if float_conv else float("nan"), top)
    return profiles


def run(weights=SHARED / "weights" / "yolov5n.pt", imgsz=(320, 640), iters=30, warmup=5, threads=0, act="relu",
        json_out=None, keep=None, profile=False) -> list[dict]:
    """Time FP32 and INT8 at each size (with ``profile``, also onnxruntime's per-op-type profile of each);
    returns one row per size."""
    from bench.onnx_latency import time_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in imgsz:
            fp32, int8 = build_pair(Path(weights), int(size), folder, act)
            t_fp32 = time_onnx(fp32, 1, None, iters, warmup, threads)
            t_int8 = time_onnx(int8, 1, None, iters, warmup, threads)
            t_default = time_onnx(int8, 1, None, iters, warmup, threads, exact_int8=False)
            row = {"imgsz": int(size), "fp32_median_ms": t_fp32["median_ms"], "int8_median_ms": t_int8["median_ms"],
                   "fp32_over_int8": t_fp32["median_ms"] / t_int8["median_ms"], "threads": threads, "iters": iters,
                   "int8_default_kernels_median_ms": t_default["median_ms"],
                   "fp32_mb": fp32.stat().st_size / 1e6, "int8_mb": int8.stat().st_size / 1e6}
            LOGGER.info("imgsz %d: FP32 median %.2f ms, INT8 QDQ median %.2f ms, FP32/INT8 x%.2f; INT8 with "
                        "onnxruntime's default (saturating on x86 without VNNI) kernels %.2f ms (files %.1f MB / "
                        "%.1f MB)", size, row["fp32_median_ms"], row["int8_median_ms"], row["fp32_over_int8"],
                        row["int8_default_kernels_median_ms"], row["fp32_mb"], row["int8_mb"])
            if profile:
                row["profile_ms_per_op_type"] = log_op_types(fp32, int8, iters, threads)
            rows.append(row)
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(json.dumps(rows))
    return rows


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=str, default=str(SHARED / "weights" / "yolov5n.pt"))
    parser.add_argument("--imgsz", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--act", type=str, default="relu", help="activation the float model is rebuilt with")
    parser.add_argument("--json", dest="json_out", type=str, default=None)
    parser.add_argument("--keep", type=str, default=None, help="folder to keep the .pt/.onnx files in")
    parser.add_argument("--profile", action="store_true",
                        help="also onnxruntime's per-node profile, summed per op type (convs: integer vs float)")
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "int8_latency")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
