"""Validate a detector (official YOLOv5 checkpoint or one of ours) on a dataset, as YOLOv5 v7.0 does.

Usage:
    python val.py --weights yolov5s.pt --data data/coco128.yaml --img 640
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from utils.boxes import xyxy2xywh
from utils.eval.evaluate import EvalOptions, result_tuple, validate

LOGGER = logging.getLogger("val")
ROOT = Path(__file__).resolve().parent
TASKS = ("train", "val", "test", "speed")


def coco80_to_coco91() -> list[int]:
    """COCO category ids of the 80 classes (the 91-id scheme skips 11 unused ids)."""
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    return [i for i in range(1, 91) if i not in unused]


class DetectionWriter:
    """Writes per-image detections as YOLO txt rows and/or COCO json records."""

    def __init__(self, save_dir: Path, save_txt: bool, save_conf: bool, save_json: bool, coco_ids: bool):
        self.labels_dir = save_dir / "labels"
        self.save_txt, self.save_conf, self.save_json = save_txt, save_conf, save_json
        self.class_map = coco80_to_coco91() if coco_ids else None
        self.records: list[dict] = []
        if save_txt:
            self.labels_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, predn: torch.Tensor, path: Path, shape0) -> None:
        if self.save_txt:
            self._write_txt(predn, path, shape0)
        if self.save_json:
            self._add_json(predn, path)

    def _write_txt(self, predn, path, shape0) -> None:
        gain = torch.tensor(shape0, dtype=torch.float32)[[1, 0, 1, 0]]
        lines = []
        for *xyxy, conf, cls in predn.tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gain).view(-1).tolist()
            row = (cls, *xywh, conf) if self.save_conf else (cls, *xywh)
            lines.append(("%g " * len(row)).rstrip() % row)
        with open(self.labels_dir / f"{path.stem}.txt", "a") as f:
            f.write("".join(line + "\n" for line in lines))

    def _add_json(self, predn, path) -> None:
        image_id = int(path.stem) if path.stem.isnumeric() else path.stem
        box = xyxy2xywh(predn[:, :4])
        box[:, :2] -= box[:, 2:] / 2  # centre -> top-left corner
        for p, b in zip(predn.tolist(), box.tolist()):
            cls = int(p[5])
            self.records.append({"image_id": image_id,
                                 "category_id": self.class_map[cls] if self.class_map else cls,
                                 "bbox": [round(x, 3) for x in b],
                                 "score": round(p[4], 5)})


def score_coco_json(pred_json: Path, anno_json: Path, im_files: list[str]) -> tuple[float, float] | None:
    """mAP50-95 and mAP50 from pycocotools, or None when it is not installed."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        LOGGER.warning("pycocotools is not installed: skipping COCO json scoring (pip install pycocotools)")
        return None
    anno = COCO(str(anno_json))
    pred = anno.loadRes(str(pred_json))
    cocoeval = COCOeval(anno, pred, "bbox")
    cocoeval.params.imgIds = [int(Path(x).stem) for x in im_files if Path(x).stem.isnumeric()]
    cocoeval.evaluate()
    cocoeval.accumulate()
    cocoeval.summarize()
    return float(cocoeval.stats[0]), float(cocoeval.stats[1])


@torch.no_grad()
def run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, max_det=300,
        task="val", device="", workers=8, single_cls=False, augment=False, verbose=False, save_txt=False,
        save_conf=False, save_json=False, project=ROOT / "runs/val", name="exp", exist_ok=False,
        half=True, save_dir=Path(""), plots=True, compute_loss=None, qat_report=False, ptq=False, calib_images=512,
        qat_config=None, memory_format="auto", ptq_sensitivity=False, target_drop=0.5):
    """Load `weights`, then validate; returns ((P, R, mAP50, mAP50-95, *mean losses), per-class mAPs,
    speeds in ms).

    `weights` may be an official or own .pt (float or QAT) or an exported .onnx file. `ptq` prepares
    a float model with `qat_config` and calibrates it on `calib_images` training images (the PTQ
    baseline); `qat_report` prints every quantizer's type, scale, range, clipping and SQNR and writes
    them (with the plan, histograms and float-vs-INT8 boxes) as quant_report.html and CSV into the run folder.
    `memory_format` (a loaded PyTorch model): 'auto' runs channels_last on CUDA, as training does.
    `compute_loss` (a ComputeLoss of the model) adds the mean validation losses to the results.
    Training validates its own model in-process with :func:`utils.eval.evaluate.validate`.
    """
    from utils.config_checks import check_flags
    from utils.data.data_config import check_img_size, load_data_config
    from utils.paths import increment_path
    from utils.torch_utils import select_device, use_channels_last

    check_flags({"imgsz": imgsz, "batch_size": batch_size, "workers": workers, "conf_thres": conf_thres,
                 "iou_thres": iou_thres, "max_det": max_det, "calib_images": calib_images})
    device = select_device(device, batch_size=batch_size)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    (save_dir / "labels" if save_txt else save_dir).mkdir(parents=True, exist_ok=True)
    data = load_data_config(data)
    if ptq_sensitivity:  # choose the layers to keep at 16 bits, then validate PTQ with that config
        ptq, qat_config = True, _sensitivity_config(weights, device, imgsz, data, calib_images, qat_config,
                                                    target_drop, batch_size, workers, save_dir)
    model, rect, imgsz = _load_for_val(weights, device, imgsz, data, ptq, calib_images, qat_config, workers)
    half &= device.type != "cpu" and not _is_quantized(model)
    if isinstance(model, torch.nn.Module) and use_channels_last(memory_format, device):
        model = model.to(memory_format=torch.channels_last)  # cuDNN's NHWC kernels are the fast ones
    stride = max(int(model.stride.max()), 32)
    imgsz = check_img_size(imgsz, stride)
    nc = 1 if single_cls else int(data["nc"])
    model_nc = int(getattr(model, "nc", None) or model.model[-1].nc)
    if model_nc != nc and not single_cls:
        raise ValueError(f"{weights}: model has {model_nc} classes but {data['yaml_file']} has {nc}; "
                         "pass matching --data or --single-cls")
    dataloader = _make_dataloader(data, task, imgsz, batch_size, stride, single_cls, workers, rect)
    if task == "speed":
        conf_thres, iou_thres = 0.25, 0.45
    anno_json = Path(data.get("path", "")) / "annotations" / "instances_val2017.json"
    writer = DetectionWriter(save_dir, save_txt, save_conf, save_json, coco_ids=anno_json.is_file())
    options = EvalOptions(conf_thres, iou_thres, max_det, single_cls, augment, half)
    result = validate(model, dataloader, data, options, compute_loss=compute_loss, save_dir=save_dir, plots=plots,
                      on_image=writer if (save_txt or save_json) else None, per_class=verbose or nc < 50,
                      speed_line=True, device=device)
    report = _qat_report(model, dataloader, device, weights, save_dir, ptq) if qat_report else []
    if save_json and writer.records:
        result = _save_and_score_json(writer, weights, save_dir, anno_json, dataloader, result)
    saved = f"\n{len(list(writer.labels_dir.glob('*.txt')))} labels saved to {writer.labels_dir}" if save_txt else ""
    LOGGER.info(f"Results saved to {save_dir}{saved}")
    if report:
        from utils.eval.quant_report import log_report_paths

        log_report_paths(report)
    return result_tuple(result)


def _sensitivity_config(weights, device, imgsz, data, calib_images, qat_config, target_drop, batch_size, workers,
                        save_dir):
    from utils.data.data_config import check_img_size
    from utils.eval.ptq_sensitivity import sensitivity_config
    from utils.qat import load_model

    model, meta = load_model(weights, device=device, fuse=False)
    if meta.get("qat"):
        raise ValueError(f"{weights}: --ptq-sensitivity needs a float checkpoint, this one is already quantized")
    stride = max(int(model.stride.max()), 32)
    imgsz = check_img_size(imgsz, stride)
    loader = _make_dataloader(data, "val", imgsz, batch_size, stride, False, workers)
    return sensitivity_config(model, data, imgsz, calib_images, qat_config, target_drop, loader, device, workers,
                              save_dir)


def _is_quantized(model) -> bool:
    from utils.qat import is_prepared

    return is_prepared(model)


def _qat_report(model, dataloader, device, weights, save_dir: Path, ptq: bool = False) -> list[Path]:
    """--qat-report: every quantizer's exponent, scale, range, clipping and SQNR printed, and written as
    CSV, PNG and the self-contained quant_report.html (returns their paths); or one line saying why
    there is nothing to report."""
    if not _is_quantized(model):
        kind = ("an ONNX file (the report reads a PyTorch model's fake quantizers)"
                if Path(str(weights)).suffix == ".onnx" else "a float model without quantizers")
        LOGGER.warning(f"WARNING: --qat-report: {weights} is {kind}; nothing to report. Give a QAT checkpoint "
                       "(train.py --qat), or add --ptq to quantize a float .pt first")
        return []
    from utils.eval.quant_report import report_quantization

    title = f"{Path(str(weights)).name}, {'PTQ' if ptq else 'QAT checkpoint'}"
    return report_quantization(model, dataloader, device, save_dir, title=title)


def _load_for_val(weights, device, imgsz, data, ptq, calib_images, qat_config, workers):
    """(model, rect batches?, image size) for a .pt (float, QAT, or float+PTQ) or .onnx file."""
    from utils.qat import load_model

    if Path(str(weights)).suffix == ".onnx":
        from utils.export.onnx_backend import load_onnx_model

        model, meta = load_onnx_model(weights, device)
        if not meta["dynamic_hw"] and imgsz != meta["imgsz"][0]:
            LOGGER.warning(f"{weights}: static ONNX model, validating at its exported size {meta['imgsz'][0]}")
        # a static file has fixed H, W: square letterbox, as upstream validates non-PyTorch backends
        return model, meta["dynamic_hw"], (imgsz if meta["dynamic_hw"] else meta["imgsz"][0])
    model, meta = load_model(weights, device=device, fuse=not ptq)
    if ptq:
        if meta.get("qat"):
            raise ValueError(f"{weights}: --ptq needs a float checkpoint, this one is already quantized")
        from utils.data.data_config import check_img_size

        imgsz = check_img_size(imgsz, max(int(model.stride.max()), 32))  # prepare traces at this size
        model = _post_training_quantize(model, device, imgsz, data, calib_images, qat_config, workers)
    return model, True, imgsz


def _post_training_quantize(model, device, imgsz, data, calib_images, qat_config, workers):
    """The PTQ baseline: the same prepare and calibration a QAT run starts from, no training."""
    from utils.data.calibration import calibrate_on_training_images
    from utils.qat import prepare_qat_model

    prepared = prepare_qat_model(model, imgsz, qat_config)
    calibrate_on_training_images(prepared, data, imgsz, calib_images, device, workers)
    return prepared.eval()


def _make_dataloader(data, task, imgsz, batch_size, stride, single_cls, workers, rect=True):
    from utils.data.dataset import create_dataloader
    from utils.log import colorstr

    split = task if task in ("train", "val", "test") else "val"
    if not data.get(split):
        raise ValueError(f"{data['yaml_file']}: no '{split}' split defined")
    pad = 0.0 if task == "speed" else 0.5
    return create_dataloader(data[split], imgsz, batch_size, stride, single_cls, pad=pad, rect=rect and task != "speed",
                             workers=workers, prefix=colorstr(f"{split}: "))[0]


def _save_and_score_json(writer, weights, save_dir, anno_json, dataloader, result):
    stem = Path(weights if isinstance(weights, (str, Path)) else "model").stem
    pred_json = save_dir / f"{stem}_predictions.json"
    pred_json.write_text(json.dumps(writer.records))
    LOGGER.info(f"Saved {len(writer.records)} detections to {pred_json}")
    if anno_json.is_file():
        scores = score_coco_json(pred_json, anno_json, dataloader.dataset.im_files)
        if scores is not None:
            result.map, result.map50 = scores
    return result


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=str, default=str(ROOT / "data/coco128.yaml"), help="dataset.yaml path")
    parser.add_argument("--weights", type=str, default=str(ROOT / "yolov5s.pt"), help="model path (.pt or .onnx)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=TASKS, help="train, val, test or speed")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true", help="augmented inference (TTA)")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file")
    parser.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference (CUDA only)")
    parser.add_argument("--qat-report", action="store_true",
                        help="QAT/PTQ models: print every quantizer's scale, range and SQNR; write quant_report.html "
                             "and quant_layers.csv")
    parser.add_argument("--ptq", action="store_true", help="post-training quantization baseline of a float model")
    parser.add_argument("--calib-images", type=int, default=512, help="--ptq: number of calibration images")
    parser.add_argument("--ptq-sensitivity", action="store_true",
                        help="--ptq: rank layers by sensitivity, keep the fewest at 16 bits for --target-drop, "
                             "write mixed_precision.yaml and validate with it")
    parser.add_argument("--target-drop", type=float, default=0.5,
                        help="--ptq-sensitivity: largest mAP50-95 drop vs float, in points")
    parser.add_argument("--qat-config", type=str, default=None, help="--ptq: quant config yaml (default data/quant/default.yaml)")
    parser.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                        help="PyTorch models: auto = channels_last on CUDA, contiguous on CPU")
    return parser.parse_args(argv)


def main(opt) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "val.py", errors=(ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
