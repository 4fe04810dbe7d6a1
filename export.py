"""Export a YOLOv5 checkpoint (official or ours) to ONNX and check it against PyTorch in onnxruntime.

Usage:
    python export.py --weights yolov5s.pt --include onnx --img 640
    python export.py --weights yolov5n.pt --img 320 --dynamic
    python export.py --weights yolov5n.pt --raw-head      # three raw head maps, decoded off-graph
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def default_check_images() -> list[Path]:
    """The shared sample images (bus.jpg, zidane.jpg) when present; else [] (random check inputs)."""
    shared = Path(os.environ.get("YQ_SHARED", ROOT.parent / "shared"))
    return [p for p in (shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg") if p.is_file()]


def run(data=None, weights=ROOT / "yolov5s.pt", imgsz=(640, 640), batch_size=1, device="cpu", include=("onnx",),
        half=False, dynamic=False, simplify=False, opset=17, raw_head=False, check_images=None, fixed_shape=False,
        openvino_compat=False, plain_qdq=False):
    """Export and check; returns the list of files written (one per --include format)."""
    from utils.export.job import export_weights

    images = default_check_images() if check_images is None else check_images
    result = export_weights(weights, imgsz=imgsz, batch_size=batch_size, device=device, half=half,
                            dynamic=dynamic, simplify=simplify, opset=opset, include=include,
                            raw_head=raw_head, data=data, check_images=images, fixed_shape=fixed_shape,
                            openvino_compat=openvino_compat, plain_qdq=plain_qdq)
    return [str(result.file)]


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=str, default=None, help="dataset.yaml whose names go in the file "
                        "(default: the checkpoint's names)")
    parser.add_argument("--weights", type=str, default=str(ROOT / "yolov5s.pt"), help="model.pt path")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640],
                        help="image (h, w); one value means square")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 half-precision export (CUDA only)")
    parser.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch too (height and width are "
                        "always free unless --fixed-shape)")
    parser.add_argument("--fixed-shape", action="store_true", help="ONNX: fix height and width to --imgsz "
                        "(for toolchains that need static shapes; val.py then letterboxes square)")
    parser.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim/onnxsim if installed")
    parser.add_argument("--opset", type=int, default=17, help="ONNX: opset version")
    parser.add_argument("--include", nargs="+", default=["onnx"], help="formats to export (supported: onnx)")
    parser.add_argument("--raw-head", action="store_true",
                        help="export the raw head maps (one output per level) instead of decoded boxes")
    parser.add_argument("--openvino-compat", action="store_true",
                        help="QDQ: identity 1x1 MaxPools where OpenVINO 2026.4 otherwise departs from the ONNX "
                             "spec (residual Adds, int8 concats); same outputs elsewhere (README, Runtimes)")
    parser.add_argument("--plain-qdq", action="store_true",
                        help="QDQ: keep the traced graph (6x6 stem conv, unpadded head convs) instead of the exact "
                             "SpaceToDepth stem and 16-channel head padding onnxruntime runs faster (README, Export)")
    parser.add_argument("--check-images", nargs="*", default=None,
                        help="images for the onnxruntime-vs-PyTorch check (default: shared bus.jpg and "
                             "zidane.jpg if present; none given: random inputs)")
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "export.py")


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
