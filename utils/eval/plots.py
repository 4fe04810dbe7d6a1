"""Figures written beside results: PR/metric curves, confusion matrix, batch mosaics, training curves.

Charts use matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), so
nothing here selects a global backend, opens a window or keeps figures alive in pyplot's registry.
Image mosaics are drawn with OpenCV.
"""
from __future__ import annotations

import colorsys
import csv
import logging
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np
import torch

from utils.boxes import xywh2xyxy

LOGGER = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["class_color", "plot_pr_curve", "plot_mc_curve", "plot_pr_curves", "plot_confusion_matrix", "plot_images",
           "plot_results"]

RESULTS_PANELS = (  # results.csv columns, in upstream's 2 x 5 layout
    "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
)


def _figure(figsize, nrows: int = 1, ncols: int = 1):
    """A figure detached from pyplot, drawn by Agg (no global backend switch, nothing to close)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols)
    return fig, axes


def _save(fig, path: PathLike, dpi: int = 250) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    fig.clear()  # release artists now rather than at garbage collection
    LOGGER.debug("saved %s", path)
    return path


def _name(names, i: int) -> str:
    if isinstance(names, Mapping):
        return str(names.get(i, i))
    return str(names[i]) if names is not None and i < len(names) else str(i)


def plot_pr_curve(px: np.ndarray, py: Sequence[np.ndarray], ap: np.ndarray,
                  save_dir: PathLike = Path("pr_curve.png"), names=()) -> Path:
    """Precision-recall curve per class (legend when < 21 classes) and their mean; saves to ``save_dir``.

    ``py`` holds one precision array (over recall ``px``) per class; ``ap`` is (k, t) with AP50 first.
    """
    fig, ax = _figure((9, 6))
    if len(py):
        curves = np.stack(py, axis=1)
        if 0 < len(names) < 21:
            for i, y in enumerate(curves.T):
                ax.plot(px, y, linewidth=1, label=f"{_name(names, i)} {ap[i, 0]:.3f}")
        else:
            ax.plot(px, curves, linewidth=1, color="grey")
        ax.plot(px, curves.mean(1), linewidth=3, color="blue",
                label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall Curve")
    return _save(fig, save_dir)


def plot_mc_curve(px: np.ndarray, py: np.ndarray, save_dir: PathLike = Path("mc_curve.png"), names=(),
                  xlabel: str = "Confidence", ylabel: str = "Metric") -> Path:
    """Metric-versus-confidence curves ``py`` (k, len(px)) per class and their smoothed mean."""
    from utils.eval.metrics import smooth

    fig, ax = _figure((9, 6))
    if 0 < len(names) < 21:
        for i, y in enumerate(py):
            ax.plot(px, y, linewidth=1, label=_name(names, i))
    else:
        ax.plot(px, py.T, linewidth=1, color="grey")
    if len(py):
        y = smooth(py.mean(0), 0.05)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-Confidence Curve")
    return _save(fig, save_dir)


def _present_class_names(names: Union[Mapping, Sequence], classes: np.ndarray) -> dict:
    """Names of the classes present in the labels, re-indexed 0..k-1 in class order (for legends)."""
    items = names.items() if isinstance(names, Mapping) else enumerate(names)
    return dict(enumerate(v for k, v in items if k in classes))


def plot_pr_curves(curves, save_dir: PathLike, names=(), prefix: str = "") -> list[Path]:
    """The four curve files of a validation run (PR, F1, P, R) from :class:`utils.eval.metrics.PRCurves`."""
    save_dir = Path(save_dir)
    names = _present_class_names(names, curves.classes)
    return [plot_pr_curve(curves.px, curves.py, curves.ap, save_dir / f"{prefix}PR_curve.png", names),
            plot_mc_curve(curves.px, curves.f1, save_dir / f"{prefix}F1_curve.png", names, ylabel="F1"),
            plot_mc_curve(curves.px, curves.p, save_dir / f"{prefix}P_curve.png", names, ylabel="Precision"),
            plot_mc_curve(curves.px, curves.r, save_dir / f"{prefix}R_curve.png", names, ylabel="Recall")]


def plot_confusion_matrix(matrix: np.ndarray, normalize: bool = True, save_dir: PathLike = "",
                          names=()) -> Path:
    """Heat map of a (nc+1, nc+1) confusion matrix (last row/column: background) -> confusion_matrix.png."""
    nc = matrix.shape[0] - 1
    array = matrix / ((matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
    array = np.where(array < 0.005, np.nan, array)  # blank rather than a wall of 0.00
    names = list(names.values()) if isinstance(names, Mapping) else list(names)
    ticks = names + ["background"] if 0 < len(names) < 99 and len(names) == nc else None

    fig, ax = _figure((12, 9))
    image = ax.imshow(np.nan_to_num(array, nan=0.0), cmap="Blues", vmin=0.0, interpolation="nearest")
    fig.colorbar(image, ax=ax)
    if nc < 30:  # annotate cells only while they stay legible
        for (r, c), v in np.ndenumerate(array):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}" if normalize else f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v > 0.5 * np.nanmax(array) else "black")
    if ticks is not None:
        size = 10 if nc < 50 else 8
        ax.set_xticks(range(nc + 1))
        ax.set_xticklabels(ticks, rotation=90, fontsize=size)
        ax.set_yticks(range(nc + 1))
        ax.set_yticklabels(ticks, fontsize=size)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix")
    return _save(fig, Path(save_dir) / "confusion_matrix.png")


def class_color(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """A distinct, stable colour for class ``i`` (golden-ratio hue steps), as 0-255 RGB (or BGR)."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)
    rgb = (int(r * 255), int(g * 255), int(b * 255))
    return rgb[::-1] if bgr else rgb


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _draw_label(im: np.ndarray, box, label: str, color, lw: int, font_scale: float) -> None:
    p1, p2 = (int(box[0]), int(box[1])), (int(box[2]), int(box[3]))
    cv2.rectangle(im, p1, p2, color, thickness=lw, lineType=cv2.LINE_AA)
    if not label:
        return
    thick = max(lw - 1, 1)
    tw, th = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)[0]
    above = p1[1] - th - 3 >= 0  # put the label inside the box when there is no room above it
    top = (p1[0], p1[1] - th - 3) if above else (p1[0], p1[1])
    bottom = (p1[0] + tw, p1[1]) if above else (p1[0] + tw, p1[1] + th + 3)
    cv2.rectangle(im, top, bottom, color, -1, cv2.LINE_AA)
    cv2.putText(im, label, (top[0], bottom[1] - 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                thick, cv2.LINE_AA)


def _tile_boxes(ti: np.ndarray, w: int, h: int, scale: float):
    """(n, 6|7) target rows of one image -> xyxy boxes (n, 4) in tile pixels, classes, confs or None."""
    boxes = xywh2xyxy(ti[:, 2:6].astype(np.float64))
    if boxes.size:
        if boxes.max() <= 1.01:  # normalised coordinates (with a little tolerance)
            boxes[:, [0, 2]] *= w
            boxes[:, [1, 3]] *= h
        elif scale < 1:
            boxes *= scale
    conf = ti[:, 6] if ti.shape[1] > 6 else None
    return boxes, ti[:, 1].astype(int), conf


def plot_images(images, targets, paths: Optional[Sequence] = None, fname: PathLike = "images.jpg",
                names=None, max_size: int = 1920, max_subplots: int = 16) -> Path:
    """Save a mosaic of a batch with its boxes, e.g. val_batch0_labels.jpg / val_batch0_pred.jpg.

    ``images`` is (B, 3, H, W) RGB, 0-1 floats or 0-255; ``targets`` (n, 6) [image index, class,
    x, y, w, h] for labels or (n, 7) with a confidence column for predictions (only conf > 0.25 is
    drawn); boxes may be normalised or in input pixels.
    """
    images, targets = _to_numpy(images), _to_numpy(targets)
    if targets.size == 0:
        targets = np.zeros((0, 6))
    if images.size and images.max() <= 1:
        images = images * 255
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs ** 0.5)  # tiles per side
    scale = min(1.0, max_size / ns / max(h, w))
    th, tw = math.ceil(scale * h), math.ceil(scale * w)
    mosaic = np.full((ns * th, ns * tw, 3), 255, dtype=np.uint8)
    fs = max(int((th + tw) * ns * 0.01), 12)  # text height in pixels, grows with the mosaic
    lw, font_scale = max(round(fs / 10), 1), fs / 32  # Hershey simplex is ~22 px tall at scale 1
    for i in range(bs):
        x, y = tw * (i % ns), th * (i // ns)
        tile = np.ascontiguousarray(images[i].transpose(1, 2, 0).clip(0, 255).astype(np.uint8))
        if scale < 1:
            tile = cv2.resize(tile, (tw, th))
        mosaic[y:y + th, x:x + tw] = tile
        cv2.rectangle(mosaic, (x, y), (x + tw, y + th), (255, 255, 255), 2)
        if paths is not None and i < len(paths):
            cv2.putText(mosaic, Path(paths[i]).name[:40], (x + 5, y + 5 + int(fs * 0.7)), cv2.FONT_HERSHEY_SIMPLEX,
                        font_scale, (220, 220, 220), max(lw - 1, 1), cv2.LINE_AA)
        if not len(targets):
            continue
        boxes, classes, conf = _tile_boxes(targets[targets[:, 0] == i], w, h, scale)
        boxes[:, [0, 2]] += x
        boxes[:, [1, 3]] += y
        for j, box in enumerate(boxes):
            if conf is not None and conf[j] <= 0.25:
                continue
            cls = _name(names, classes[j]) if names is not None else str(classes[j])
            label = cls if conf is None else f"{cls} {conf[j]:.1f}"
            _draw_label(mosaic, box, label, class_color(classes[j]), lw, font_scale)
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(fname), cv2.cvtColor(mosaic, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{fname}: could not write image mosaic")
    return fname


def plot_results(csv_file: PathLike, save_path: Optional[PathLike] = None) -> Path:
    """Plot a training results.csv (upstream's columns) as a 2 x 5 grid -> results.png beside it."""
    csv_file = Path(csv_file)
    with open(csv_file, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{csv_file}: results.csv is empty")
    header = [c.strip() for c in rows[0]]  # upstream pads its column names with spaces
    missing = [c for c in ("epoch", *RESULTS_PANELS) if c not in header]
    if missing:
        raise ValueError(f"{csv_file}: results.csv lacks columns {missing}")
    try:
        data = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=float).reshape(-1, len(header))
    except ValueError as e:
        raise ValueError(f"{csv_file}: non-numeric value in results.csv ({e})") from e
    fig, axes = _figure((12, 6), 2, 5)
    x = data[:, header.index("epoch")]
    for ax, column in zip(axes.ravel(), RESULTS_PANELS):
        ax.plot(x, data[:, header.index(column)], marker=".", label=csv_file.stem, linewidth=2, markersize=8)
        ax.set_title(column, fontsize=12)
    axes.ravel()[1].legend()
    return _save(fig, save_path or csv_file.with_name("results.png"), dpi=200)
