"""Run an exported ONNX detector in onnxruntime and OpenVINO and print how far they agree.

Usage:
    python -m bench.runtime_agreement --onnx qat.onnx --imgsz 320 --n-images 8 --json agreement.json

Every runtime is compared with onnxruntime running with all graph optimisations off (each
QuantizeLinear/DequantizeLinear on its own: the ONNX specification's arithmetic): onnxruntime with all
optimisations as this project runs it (exact 8-bit kernels, utils.export.onnx_backend.EXACT_INT8_CONFIG),
the same without that session option (a session left at onnxruntime's defaults: on x86 CPUs without
VNNI its fast kernels saturate), and OpenVINO's CPU plugin with its default settings when the
``openvino`` package is installed (it is not a dependency; without it that line is skipped with a
notice). Per head level: the largest difference in quantization steps, the fraction of values more
than one step apart and the fraction not identical (utils.export.onnx_runtimes says how the steps are read
back). Detections: boxes after NMS (conf 0.25, IoU 0.45) and how many pair up with the reference's
(same class, IoU >= 0.5). Also prints onnxruntime's optimised-graph conv kernels (QLinearConv vs
float Conv). Images: ../shared/images, then coco128, letterboxed to the file's fixed size or --imgsz.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

LOGGER = logging.getLogger("bench.runtime_agreement")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YQ_SHARED", ROOT.parent / "shared"))


def default_images(n: int) -> list[Path]:
    """The shared sample images, then coco128's, ``n`` in all."""
    pool = sorted((SHARED / "images").glob("*.jpg"))
    pool += sorted((SHARED / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))
    return pool[:n]


def _input_hw(model: Any, imgsz: int) -> tuple[int, int]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    h, w = (d.dim_value for d in dims[2:4])
    return (h, w) if h and w else (imgsz, imgsz)


def compare_runs(ref: list, got: list, codes_of, conf_thres: float, iou_thres: float) -> dict[str, Any]:
    """Per-level step agreement and detection matching of one runtime's outputs against the reference's."""
    from utils.export.onnx_runtimes import match_after_nms, step_agreement

    levels = len(codes_of(ref[0]))
    per_level = []
    for i in range(levels):
        agree = step_agreement([codes_of(r)[i] for r in ref], [codes_of(g)[i] for g in got])
        per_level.append({"max_steps": agree.max_steps, "over_one": agree.over_one, "differ": agree.differ})
    boxes = [match_after_nms(r, g, conf_thres, iou_thres)[0] for r, g in zip(ref, got)]
    return {"levels": per_level, "ref_boxes": sum(b[0] for b in boxes), "boxes": sum(b[1] for b in boxes),
            "matched": sum(b[2] for b in boxes), "images_same_boxes": sum(b[0] == b[1] == b[2] for b in boxes)}


def _line(name: str, result: dict) -> str:
    lv = result["levels"]
    top = "/".join(str(x["max_steps"]) for x in lv)
    over = "/".join(f"{x['over_one']:.2%}" for x in lv)
    differ = "/".join(f"{x['differ']:.1%}" for x in lv)
    return (f"{name:32s} head steps max {top}, >1 step {over}, not identical {differ}; "
            f"boxes {result['boxes']} vs {result['ref_boxes']}, {result['matched']} matched")


def run(onnx_file: str = "", imgsz: int = 320, n_images: int = 8, images: Optional[list[str]] = None,
        conf_thres: float = 0.25, iou_thres: float = 0.45, json_out: Optional[str] = None) -> dict[str, Any]:
    """Measure and print; returns the numbers (also written to ``json_out``)."""
    import onnx
    import onnxruntime

    from utils.export.onnx_check import sample_batch
    from utils.export.onnx_runtimes import (conv_kernels, head_codes, head_steps, onnxruntime_runner, openvino_runner,
                                     ort_optimized_ops)

    path = Path(onnx_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX file not found")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if "strides" not in meta or "anchors" not in meta or json.loads(meta.get("raw_head", "false")):
        raise ValueError(f"{path}: needs a decoded-head file written by export.py (strides/anchors metadata)")
    strides, anchors = json.loads(meta["strides"]), json.loads(meta["anchors"])
    hw = _input_hw(model, imgsz)
    steps = head_steps(model, len(strides))
    files = [Path(p) for p in images] if images else default_images(n_images)
    batches = [sample_batch([f], 1, hw).numpy() for f in files]
    ops = ort_optimized_ops(path)
    kernels = conv_kernels(ops)

    def codes_of(out):
        return head_codes(out, strides, anchors, hw, steps)

    reference = [onnxruntime_runner(path, optimize=False)(x) for x in batches]
    results: dict[str, Any] = {
        "file": str(path), "imgsz": list(hw), "images": [str(f) for f in files], "head_steps": steps,
        "ort_version": onnxruntime.__version__, "ort_qlinearconv": kernels.integer, "ort_float_conv": kernels.float,
        "ort_ops": dict(ops)}
    ort_all = onnxruntime_runner(path, optimize=True)
    results["onnxruntime"] = compare_runs(reference, [ort_all(x) for x in batches], codes_of, conf_thres, iou_thres)
    ort_default = onnxruntime_runner(path, optimize=True, exact_int8=False)
    results["onnxruntime_default_kernels"] = compare_runs(reference, [ort_default(x) for x in batches], codes_of,
                                                          conf_thres, iou_thres)
    ov = openvino_runner(path)
    if ov is not None:
        results["openvino_version"] = ov[1]
        results["openvino"] = compare_runs(reference, [ov[0](x) for x in batches], codes_of, conf_thres, iou_thres)
    print(f"{path.name}: {len(files)} images at {hw[0]}x{hw[1]}, head steps {steps}; onnxruntime "
          f"{onnxruntime.__version__} optimised graph: {kernels.integer} QLinearConv, {kernels.float} float Conv")
    print(f"reference: onnxruntime, graph optimisations off ({results['onnxruntime']['ref_boxes']} boxes)")
    print(_line("onnxruntime (all optimisations)", results["onnxruntime"]))
    print(_line("  without x64quantprecision", results["onnxruntime_default_kernels"])
          + " (onnxruntime's default 8-bit kernels: they saturate on x86 CPUs without VNNI)")
    if ov is None:
        print("openvino: not installed, skipped (pip install openvino, in its own environment)")
    else:
        print(_line(f"openvino {ov[1]} CPU", results["openvino"]))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", dest="onnx_file", type=str, required=True, help="ONNX file from export.py")
    parser.add_argument("--imgsz", type=int, default=320, help="input size for files with free height/width")
    parser.add_argument("--n-images", type=int, default=8, help="how many default images (shared, then coco128)")
    parser.add_argument("--images", nargs="*", default=None, help="image files instead of the defaults")
    parser.add_argument("--conf-thres", type=float, default=0.25)
    parser.add_argument("--iou-thres", type=float, default=0.45)
    parser.add_argument("--json", dest="json_out", type=str, default=None)
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "runtime_agreement")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
