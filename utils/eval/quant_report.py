"""The quantization report of a QAT or PTQ model (val.py --qat-report, the end of train.py --qat).

One list of per-quantizer rows (:func:`quant.layer_error.layer_errors` on a few validation images)
is printed as a table and written as ``quant_layers.csv``, ``quant_layers.png`` and, with the plan,
histograms of the worst layers' activations and float-vs-INT8 detections, as the self-contained
``quant_report.html`` (:mod:`utils.eval.quant_report_html`).

Example:
    >>> paths = report_quantization(model, val_loader, "cpu", save_dir, title="best.pt")  # doctest: +SKIP
    >>> log_report_paths(paths)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn

from quant.layer_error import (LayerError, float_activations, format_layer_errors, layer_errors, plot_layer_errors,
                               write_layer_errors_csv)
from quant.schedule import flags_restored, set_fake_quant
from utils.data.images import read_image
from utils.eval.annotate import draw_detections, side_by_side
from utils.eval.box_match import match_detections
from utils.eval.predict import Detector
from utils.eval.quant_report_html import DetectionPair, QuantReport, histograms_png, render_html

__all__ = ["float_vs_int8", "log_report_paths", "report_quantization", "try_report_quantization",
           "worst_activations"]

LOGGER = logging.getLogger(__name__)

HTML_NAME, CSV_NAME, PNG_NAME = "quant_report.html", "quant_layers.csv", "quant_layers.png"
PANEL_SIDE = 400  # longest side (px) of each half of a detection picture: keeps the page small


def worst_activations(rows: Sequence[LayerError], n: int) -> list[str]:
    """The ``n`` activation quantizers with the lowest finite SQNR alone, worst first."""
    acts = [r for r in rows if r.kind == "activation" and math.isfinite(r.sqnr_alone)]
    return [r.name for r in sorted(acts, key=lambda r: r.sqnr_alone)[:n]]


def _class_names(model: nn.Module) -> dict:
    names = getattr(model, "names", None)
    return dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names or {})


def _panel(image: np.ndarray, boxes: torch.Tensor, names: dict) -> np.ndarray:
    """A copy of ``image`` resized to PANEL_SIDE (longest side) with ``boxes`` drawn on it."""
    gain = PANEL_SIDE / max(image.shape[:2])
    resized = cv2.resize(image, (round(image.shape[1] * gain), round(image.shape[0] * gain)),
                         interpolation=cv2.INTER_AREA if gain < 1 else cv2.INTER_LINEAR)
    boxes = boxes.clone()
    boxes[:, :4] *= gain
    return draw_detections(resized, boxes, names)


@torch.no_grad()
def float_vs_int8(model: nn.Module, files: Sequence[str], device: Any, imgsz: int,
                  iou_thres: float = 0.5) -> list[DetectionPair]:
    """Boxes of the model as quantized and of the same model with fake quantization off, on each image
    (detect.py's thresholds), matched one to one at ``iou_thres`` within a class. The model's flags
    and mode are restored afterwards."""
    names = _class_names(model)
    detector = Detector(model, "", torch.device(device), imgsz, names)
    images = [read_image(f) for f in files]
    with flags_restored(model):
        int8 = [detector.predict(im).boxes.cpu() for im in images]
        set_fake_quant(model, False)
        floats = [detector.predict(im).boxes.cpu() for im in images]
    pairs = []
    for file, im, a, b in zip(files, images, floats, int8):
        match = match_detections(a, b, iou_thres)
        picture = side_by_side(_panel(im, a, names), _panel(im, b, names),
                               (f"float: {match.n_a} boxes", f"INT8: {match.n_b} boxes, {match.matched} matched"))
        pairs.append(DetectionPair(Path(file).name, picture, match.n_a, match.n_b, match.matched))
    return pairs


def report_quantization(model: nn.Module, dataloader, device: Any, save_dir: Path, title: str = "",
                        n_images: int = 8, n_worst: int = 4, n_detect: int = 3) -> list[Path]:
    """Measure on the first ``n_images`` of the dataloader's first batch, print the table, write the
    CSV, the PNG and the HTML into ``save_dir``; returns their paths (HTML first)."""
    start, save_dir = time.perf_counter(), Path(save_dir)
    images = next(iter(dataloader))[0][:n_images].to(device).float() / 255
    rows = layer_errors(model, images)
    LOGGER.info("\n" + format_layer_errors(rows))
    csv_path = write_layer_errors_csv(rows, save_dir / CSV_NAME)
    png_path = plot_layer_errors(rows, save_dir / PNG_NAME)
    worst = worst_activations(rows, n_worst)
    charts = {"layers": png_path.read_bytes()}
    if worst:
        charts["histograms"] = histograms_png(rows, float_activations(model, images, worst))
    dataset = dataloader.dataset
    files = dataset.im_files  # rect loaders sort by aspect ratio: take them across the range
    picked = sorted({i * len(files) // n_detect for i in range(n_detect)}) if files and n_detect > 0 else []
    detections = float_vs_int8(model, [files[i] for i in picked], device, dataset.img_size)
    report = QuantReport(title=title, rows=rows, plan=getattr(model, "plan", None),
                         measured_on=f"{images.shape[0]} validation images of {images.shape[3]}x{images.shape[2]} px",
                         worst=worst, charts=charts, detections=detections, files=[CSV_NAME, PNG_NAME],
                         seconds=time.perf_counter() - start)
    html_path = save_dir / HTML_NAME
    html_path.write_text(render_html(report), encoding="utf-8")
    return [html_path, csv_path, png_path]


def try_report_quantization(model: nn.Module, dataloader, device: Any, save_dir: Path, title: str = "") -> list[Path]:
    """:func:`report_quantization`, or one warning line and [] when it fails (a finished training run
    must not be lost to its report)."""
    try:
        return report_quantization(model, dataloader, device, save_dir, title)
    except Exception as err:  # noqa: BLE001 - any failure of an optional report is a warning, by design
        LOGGER.warning(f"WARNING: quantization report not written: {type(err).__name__}: {err}")
        return []


def log_report_paths(paths: Sequence[Path]) -> None:
    """The closing lines: where the HTML report and the CSV table are."""
    by_name = {Path(p).name: p for p in paths}
    if HTML_NAME in by_name:
        html_path = Path(by_name[HTML_NAME])
        LOGGER.info(f"Quantization report: {html_path} ({html_path.stat().st_size / 1e6:.2f} MB)")
    if CSV_NAME in by_name:
        LOGGER.info(f"Quantization table: {by_name[CSV_NAME]}")
