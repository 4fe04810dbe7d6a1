"""Run a detector on images and videos and save annotated copies, as YOLOv5 v7.0's detect.py does.

Boxes are exactly val.py's predictions at the same thresholds (val's letterbox for one image and
val's NMS), so what you see is what val.py scores. ``--compare`` runs a second model on the same
frames and shows both side by side (e.g. the float model and its INT8 QDQ ONNX export).

Usage:
    python detect.py --weights yolov5s.pt --source data/images
    python detect.py --weights best.pt --compare best.onnx --source bus.jpg --img 320
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

LOGGER = logging.getLogger("detect")
ROOT = Path(__file__).resolve().parent


def _frame_line(frame, pred, names) -> str:
    from utils.detect.output import describe_counts

    counts = describe_counts(pred.boxes, names)
    return (f"{frame.progress()}{pred.shape[2]}x{pred.shape[3]} {counts}"
            f"{'' if pred.boxes.shape[0] else '(no detections), '}{pred.times[1] * 1e3:.1f}ms")


def _annotate(frame, pred, detector, opt):
    from utils.eval.annotate import draw_detections

    return draw_detections(frame.image.copy(), pred.boxes, detector.names, opt["line_thickness"],
                           opt["hide_labels"], opt["hide_conf"])


def _speed_line(times, shapes, seen) -> str:
    t = tuple(x / max(seen, 1) * 1e3 for x in times)
    shape = shapes[0] if len(shapes) == 1 else ", ".join(str(s) for s in shapes)  # each shape that ran
    return f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {shape}" % t


@torch.no_grad()
def run(weights=ROOT / "yolov5s.pt", source=ROOT / "data/images", data=ROOT / "data/coco128.yaml", imgsz=640,
        conf_thres=0.25, iou_thres=0.45, max_det=1000, device="", view_img=False, save_txt=False,
        save_conf=False, save_crop=False, nosave=False, classes=None, agnostic_nms=False, augment=False,
        project=ROOT / "runs/detect", name="exp", exist_ok=False, line_thickness=3, hide_labels=False,
        hide_conf=False, half=False, vid_stride=1, compare=None):
    """Detect objects in every frame of ``source``; returns the run folder.

    ``compare`` (weights) adds a second model: each saved image shows both models' boxes side by
    side, and the log counts each model's boxes and the pairs that match (IoU >= 0.5, same class).
    """
    from utils.data.sources import iterate_frames, list_source_files
    from utils.detect.load import load_detector
    from utils.detect.output import OutputWriter, check_display
    from utils.eval.predict import NmsOptions
    from utils.paths import increment_path
    from utils.torch_utils import select_device

    files = list_source_files(source)  # refusals (webcam, stream, missing) come before any loading
    if view_img:
        check_display()
    imgsz = imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz
    device = select_device(device)
    detectors = [load_detector(w, device, imgsz, half, data, augment) for w in [weights, compare] if w]
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    save_dir.mkdir(parents=True, exist_ok=True)
    writer = OutputWriter(save_dir, not nosave, save_txt, save_conf, save_crop)
    options = NmsOptions(conf_thres, iou_thres, max_det, classes, agnostic_nms)
    opt = {"line_thickness": line_thickness, "hide_labels": hide_labels, "hide_conf": hide_conf}
    times, shapes, seen, totals = [[0.0] * 3 for _ in detectors], [[] for _ in detectors], 0, [0, 0, 0]
    try:
        for frame in iterate_frames(files, vid_stride):
            preds = [d.predict(frame.image, options, augment) for d in detectors]
            seen += 1
            for i, p in enumerate(preds):
                times[i] = [a + b for a, b in zip(times[i], p.times)]
                if p.shape not in shapes[i]:
                    shapes[i].append(p.shape)
            LOGGER.info(_frame_line(frame, preds[0], detectors[0].names))
            writer.labels(frame, preds[0].boxes)
            writer.crops(frame, preds[0].boxes, detectors[0].names)
            annotated = _annotate(frame, preds[0], detectors[0], opt)
            if compare:
                annotated, match = _compare(frame, preds, detectors, annotated, opt)
                totals = [totals[0] + match.n_a, totals[1] + match.n_b, totals[2] + match.matched]
            writer.image(frame, annotated)
            if view_img:
                _show(frame.path, annotated)
    finally:
        writer.close()
    _log_summary(detectors, times, shapes, seen, totals if compare else None, save_dir, writer)
    return save_dir


def _compare(frame, preds, detectors, annotated, opt):
    from utils.eval.annotate import side_by_side
    from utils.eval.box_match import match_detections

    match = match_detections(preds[0].boxes, preds[1].boxes)
    names = [Path(d.weights).name for d in detectors]
    if names[0] == names[1]:
        names = [str(d.weights) for d in detectors]
    LOGGER.info("  compare: " + match.summary(*names))
    other = _annotate(frame, preds[1], detectors[1], opt)
    titles = [f"{n}: {p.boxes.shape[0]} boxes" for n, p in zip(names, preds)]
    return side_by_side(annotated, other, titles), match


def _show(path: str, image) -> None:
    import cv2

    cv2.imshow(str(path), image)
    cv2.waitKey(1)


def _log_summary(detectors, times, shapes, seen, totals, save_dir, writer) -> None:
    from utils.log import colorstr

    LOGGER.info(_speed_line(times[0], shapes[0], seen))
    if totals is not None:
        a, b = (Path(d.weights).name for d in detectors)
        LOGGER.info(f"Compare speed ({b}): " + _speed_line(times[1], shapes[1], seen)[len("Speed: "):])
        LOGGER.info(f"Compare: {a} found {totals[0]} boxes, {b} found {totals[1]}, {totals[2]} matched "
                    f"(IoU >= 0.5, same class) over {seen} images")
    saved = ""
    if writer.save_txt:
        saved = f"\n{len(list(writer.labels_dir.glob('*.txt')))} labels saved to {writer.labels_dir}"
    LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{saved}")


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=str, default=str(ROOT / "yolov5s.pt"), help="model path (.pt or .onnx)")
    parser.add_argument("--source", type=str, default=str(ROOT / "data/images"),
                        help="image or video file, folder, glob or .txt list")
    parser.add_argument("--data", type=str, default=str(ROOT / "data/coco128.yaml"),
                        help="dataset.yaml: class names for models that carry none")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="augmented inference (float PyTorch models)")
    parser.add_argument("--project", default=str(ROOT / "runs/detect"), help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", action="store_true", help="hide confidences")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    parser.add_argument("--compare", type=str, default=None,
                        help="second model (.pt or .onnx) drawn side by side, with matched-box counts")
    opt = parser.parse_args(argv)
    if len(opt.imgsz) > 2 or (len(opt.imgsz) == 2 and opt.imgsz[0] != opt.imgsz[1]):
        parser.error(f"--imgsz {' '.join(map(str, opt.imgsz))}: one size (the long side), as val.py takes")
    opt.imgsz = opt.imgsz[0]
    return opt


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "detect.py", errors=(ValueError, OSError, ImportError))


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
