"""The validation loop: run a detector over a dataloader and score it as YOLOv5 v7.0 does.

`validate()` is what `val.run` and the training loop both call; `evaluate()` is its loop. It knows nothing of files on disk
beyond the optional writers passed to it, so it can score a float model, a QAT model or an ONNX
session wrapped as a callable.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import scale_boxes, xywh2xyxy
from utils.eval.metrics import ConfusionMatrix, at_best_f1, match_predictions_torch, pr_curves
from utils.eval.nms import non_max_suppression
from utils.log import TQDM_BAR_FORMAT
from utils.torch_utils import time_sync

LOGGER = logging.getLogger(__name__)

HEADER = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
ROW = "%22s" + "%11i" * 2 + "%11.3g" * 4
IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)  # mAP@0.5:0.95


@dataclass
class EvalResult:
    """Scores of one evaluation; field names follow val.py's printed table."""

    mp: float = 0.0
    mr: float = 0.0
    map50: float = 0.0
    map: float = 0.0
    seen: int = 0
    instances: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # per class
    ap_class: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    r: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap50: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ap: np.ndarray = field(default_factory=lambda: np.zeros(0))
    maps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per class mAP50-95, nc long
    speeds_ms: tuple = (0.0, 0.0, 0.0)  # pre-process, inference, NMS per image
    loss: Optional[torch.Tensor] = None  # mean (box, obj, cls) when a loss function was given
    input_shape: tuple = ()  # the largest input (by element count) the model or ONNX session ran

    def row(self, name: str = "all") -> str:
        return ROW % (name, self.seen, self.instances.sum(), self.mp, self.mr, self.map50, self.map)


@dataclass
class EvalOptions:
    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    single_cls: bool = False
    augment: bool = False
    half: bool = False


def _labels_per_image(targets: torch.Tensor, nb: int) -> tuple[torch.Tensor, ...]:
    """Split batch targets (n, 6) [image, cls, xywh] into nb per-image (k, 5) [cls, xywh] views.

    One host read per batch (the counts) instead of a boolean mask per image; the stable sort keeps
    each image's label order, which matching ties depend on.
    """
    targets = targets[torch.sort(targets[:, 0], stable=True).indices]
    counts = torch.bincount(targets[:, 0].long(), minlength=nb).tolist()
    return targets[:, 1:].split(counts)


def _image_stats(pred, labels, image_shape, shape0, ratio_pad, iouv, confusion):
    """Correctness matrix (on the device) and predictions of one image, in original-image pixels."""
    predn = pred.clone()
    scale_boxes(image_shape, predn[:, :4], shape0, ratio_pad)
    if not labels.shape[0]:
        return torch.zeros(pred.shape[0], iouv.numel(), dtype=torch.bool, device=pred.device), predn
    tbox = xywh2xyxy(labels[:, 1:5])
    scale_boxes(image_shape, tbox, shape0, ratio_pad)
    labelsn = torch.cat((labels[:, 0:1], tbox), 1)
    if confusion is not None:
        confusion.process_batch(predn, labelsn)
    return match_predictions_torch(predn, labelsn, iouv), predn


def evaluate(
    model: Callable,
    dataloader,
    device: torch.device,
    nc: int,
    names: dict,
    options: EvalOptions = EvalOptions(),
    compute_loss: Optional[Callable] = None,
    save_dir: Optional[Path] = None,
    plots: bool = False,
    on_image: Optional[Callable] = None,
) -> EvalResult:
    """Run `model` (eval mode, returns (decoded, raw maps)) over `dataloader` and compute mAP.

    `on_image(predn, path, shape0)` is called with each image's detections in original pixels (used by
    val.py to write txt/json). Plots (PR curves, confusion matrix, batch mosaics) go to `save_dir`.
    """
    iouv = IOU_THRESHOLDS.to(device)
    confusion = ConfusionMatrix(nc=nc) if plots else None
    stats, seen = [], 0
    dt = [0.0, 0.0, 0.0]
    input_shape: tuple = ()
    loss = torch.zeros(3, device=device)
    for batch_i, (im, targets, paths, shapes) in enumerate(
            tqdm(dataloader, desc=HEADER, bar_format=TQDM_BAR_FORMAT)):
        t0 = time_sync()
        im = im.to(device, non_blocking=True)
        im = (im.half() if options.half else im.float()) / 255
        targets = targets.to(device)
        nb, _, height, width = im.shape
        t1 = time_sync()
        out = model(im, augment=options.augment) if options.augment else model(im)
        preds, raw = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        t2 = time_sync()
        ran = tuple(getattr(model, "last_input_shape", None) or im.shape)
        input_shape = ran if math.prod(ran) > math.prod(input_shape) else input_shape
        if compute_loss is not None and raw is not None:
            loss += compute_loss(raw, targets)[1]
        targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
        preds = non_max_suppression(preds, options.conf_thres, options.iou_thres, multi_label=True,
                                    agnostic=options.single_cls, max_det=options.max_det)
        t3 = time_sync()
        dt = [dt[0] + t1 - t0, dt[1] + t2 - t1, dt[2] + t3 - t2]
        for si, (pred, labels) in enumerate(zip(preds, _labels_per_image(targets, nb))):
            seen += 1
            if pred.shape[0] == 0:
                if labels.shape[0]:
                    stats.append((torch.zeros(0, iouv.numel(), dtype=torch.bool, device=device),
                                  torch.zeros(0, device=device), torch.zeros(0, device=device), labels[:, 0]))
                    if confusion is not None:
                        confusion.process_batch(None, labels[:, 0])
                continue
            if options.single_cls:
                pred[:, 5] = 0
            correct, predn = _image_stats(pred, labels, im[si].shape[1:], shapes[si][0], shapes[si][1],
                                          iouv, confusion)
            stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))  # stay on the device until the end
            if on_image is not None:
                on_image(predn, Path(paths[si]), shapes[si][0])
        if plots and save_dir is not None and batch_i < 3:
            _plot_batch(im, targets, preds, paths, names, save_dir, batch_i)

    result = _summarise(stats, nc, names, plots, save_dir)
    result.seen, result.input_shape = seen, input_shape
    result.speeds_ms = tuple(x / max(seen, 1) * 1e3 for x in dt)
    if compute_loss is not None:
        result.loss = loss.cpu() / max(len(dataloader), 1)
    if confusion is not None and save_dir is not None:
        from utils.eval.plots import plot_confusion_matrix

        plot_confusion_matrix(confusion.matrix, save_dir=save_dir, names=list(names.values()))
    return result


@torch.no_grad()
def validate(model: torch.nn.Module, dataloader, data: dict, options: EvalOptions = EvalOptions(), *,
             compute_loss: Optional[Callable] = None, save_dir: Optional[Path] = None, plots: bool = False,
             on_image: Optional[Callable] = None, per_class: bool = False, speed_line: bool = False,
             device: Optional[torch.device] = None) -> EvalResult:
    """Score a built PyTorch detector (or an ONNX session wrapper) on ``dataloader`` and print the table.

    What both training (every epoch, on its EMA model) and ``val.run`` (after loading a file) call.
    ``data`` is a loaded dataset config (``nc``, ``names``); ``options.half`` runs in fp16 (ignored on
    CPU). ``per_class`` adds a row per class; ``speed_line`` the Speed line with the input shape that ran. ``device`` defaults
    to the model's (give it for a model without parameters, e.g. an ONNX session).

    Example:
        >>> result = validate(model, loader, load_data_config("coco128.yaml"), EvalOptions(iou_thres=0.65))
        >>> result.map50, result.map
    """
    device = device if device is not None else next(model.parameters()).device
    options = replace(options, half=options.half and device.type != "cpu")
    model = model.half() if options.half else model.float()
    model.eval()
    nc = 1 if options.single_cls else int(data["nc"])
    names = {0: "item"} if options.single_cls and len(data["names"]) != 1 else dict(data["names"])
    result = evaluate(model, dataloader, device, nc, names, options, compute_loss=compute_loss,
                      save_dir=save_dir if plots else None, plots=plots, on_image=on_image)
    print_results(result, names, per_class=per_class, batch_shape=result.input_shape if speed_line else None)
    return result


def result_tuple(result: EvalResult) -> tuple[tuple, np.ndarray, tuple]:
    """val.run's return value: ((P, R, mAP50, mAP50-95, *mean losses), per-class mAPs, speeds in ms)."""
    losses = result.loss.tolist() if result.loss is not None else [0.0, 0.0, 0.0]
    return (result.mp, result.mr, result.map50, result.map, *losses), result.maps, result.speeds_ms


def _summarise(stats, nc, names, plots, save_dir) -> EvalResult:
    result = EvalResult(maps=np.zeros(nc))
    if not stats:
        result.instances = np.zeros(nc, dtype=int)
        return result
    # one device-to-host copy per statistic for the whole run
    tp, conf, pred_cls, target_cls = (torch.cat(x, 0).cpu().numpy() for x in zip(*stats))
    result.instances = np.bincount(target_cls.astype(int), minlength=nc)
    if tp.shape[0] and tp.any():
        curves, nt = pr_curves(tp, conf, pred_cls, target_cls)
        if plots and save_dir is not None:
            from utils.eval.plots import plot_pr_curves

            plot_pr_curves(curves, save_dir, names)
        _, _, p, r, _, ap, ap_class = at_best_f1(curves, nt)
        result.ap50, result.ap = ap[:, 0], ap.mean(1)
        result.p, result.r, result.ap_class = p, r, ap_class
        result.mp, result.mr = float(p.mean()), float(r.mean())
        result.map50, result.map = float(result.ap50.mean()), float(result.ap.mean())
    result.maps = np.zeros(nc) + result.map
    for i, c in enumerate(result.ap_class):
        result.maps[c] = result.ap[i]
    return result


def print_results(result: EvalResult, names: dict, per_class: bool, batch_shape=None) -> None:
    """Upstream's table: the `all` row, optional per-class rows, and the speed line."""
    LOGGER.info(result.row("all"))
    if result.instances.sum() == 0:
        LOGGER.warning("WARNING: no labels found in the set, can not compute metrics without labels")
    if per_class and len(names) > 1:
        for i, c in enumerate(result.ap_class):
            LOGGER.info(ROW % (names[c], result.seen, result.instances[c], result.p[i], result.r[i],
                               result.ap50[i], result.ap[i]))
    if batch_shape is not None:
        LOGGER.info("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape %s"
                    % (*result.speeds_ms, tuple(batch_shape)))


def _plot_batch(im, targets, preds, paths, names, save_dir, batch_i) -> None:
    from utils.eval.plots import plot_images

    plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
    plot_images(im, detections_to_targets(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", names)


def detections_to_targets(preds: list) -> torch.Tensor:
    """Per-image NMS output -> one (n, 7) tensor [batch index, class, x, y, w, h, conf] for plotting."""
    from utils.boxes import xyxy2xywh

    rows = [torch.cat((torch.full((p.shape[0], 1), i, device=p.device), p[:, 5:6], xyxy2xywh(p[:, :4]),
                       p[:, 4:5]), 1) for i, p in enumerate(preds)]
    return torch.cat(rows, 0).cpu() if rows else torch.zeros(0, 7)
