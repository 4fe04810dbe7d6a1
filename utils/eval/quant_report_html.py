"""quant_report.html: one self-contained page (inline CSS, images as data URIs, no script) that shows a
quantized model's plan, its per-quantizer table, charts of SQNR and clipping, histograms of the worst
layers' activations and float-vs-INT8 detections.

This module only draws and writes; :mod:`utils.eval.quant_report` measures. The quantizer table's cells
are :func:`quant.layer_error.cells` of the same rows the printed table and the CSV come from.

Example:
    >>> page = render_html(QuantReport(title="best.pt", rows=rows, plan=model.plan))  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from quant.layer_error import COLUMNS, LayerError, cells

__all__ = ["DetectionPair", "QuantReport", "TABLE_KEYS", "histograms_png", "render_html"]

# The quantizer table's columns: the printed table's, with bits, sign and the grid's range added.
TABLE_KEYS = ("name", "kind", "dtype", "bits", "sign", "exponent", "scale", "range", "observed", "clipped",
              "sqnr_alone", "sqnr_accumulated")
_HEADERS = {**{key: header for key, header, _ in COLUMNS}, "bits": "bits", "sign": "sign",
            "range": "grid range", "sqnr_accumulated": "SQNR accumulated"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
padding:0 16px;color:#1d1d1f}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555}table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}.text{text-align:left}summary{cursor:pointer;color:#0645ad}
tr.worst td{background:#fde8e8}img{max-width:100%;border:1px solid #eee}
figure{margin:12px 0}figcaption{color:#444;font-size:13px}.scroll{overflow-x:auto}
"""


@dataclass
class DetectionPair:
    """One validation image with the float model's boxes beside the INT8 model's (BGR, drawn)."""

    file: str
    image: np.ndarray
    n_float: int
    n_int8: int
    matched: int


@dataclass
class QuantReport:
    """Everything the page shows. ``charts``: PNG bytes by name ('layers': SQNR and clipping bars,
    'histograms': the worst layers' activations); ``worst``: the quantizers of those histograms."""

    title: str
    rows: list[LayerError]
    plan: Optional[Sequence] = None  # a quant.prepare.QuantPlan
    measured_on: str = ""
    worst: list[str] = field(default_factory=list)
    charts: dict[str, bytes] = field(default_factory=dict)
    detections: list[DetectionPair] = field(default_factory=list)
    iou_thres: float = 0.5
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0  # time taken to measure and draw


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def histograms_png(rows: Sequence[LayerError], samples: dict[str, torch.Tensor]) -> bytes:
    """One PNG with a histogram per entry of ``samples`` (log counts), the grid's range
    [quant_min * scale, quant_max * scale] marked by dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_name = {r.name: r for r in rows}
    names = list(samples)
    ncols = 2 if len(names) > 1 else 1
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(5.5 * ncols, 2.8 * nrows))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax, row = fig.add_subplot(nrows, ncols, i + 1), by_name[name]
        ax.hist(samples[name].numpy(), bins=120, color="tab:blue", log=True)
        for edge in (row.range_lo, row.range_hi):
            if math.isfinite(edge):
                ax.axvline(edge, color="tab:red", linestyle="--", linewidth=1.2)
        text = cells(row)
        ax.set_title(f"{name}\nSQNR alone {text['sqnr_alone']}, clipped {text['clipped']}, grid {text['range']}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[str]], text_cols: int,
           row_attrs: Sequence[str] = ()) -> str:
    """An HTML table; the first ``text_cols`` columns are left-aligned text."""
    head = "".join(f"<th class=\"text\">{_esc(h)}</th>" if j < text_cols else f"<th>{_esc(h)}</th>"
                   for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        tds = "".join(f"<td class=\"text\">{_esc(c)}</td>" if j < text_cols else f"<td>{_esc(c)}</td>"
                      for j, c in enumerate(row))
        body.append(f"<tr{row_attrs[i] if i < len(row_attrs) else ''}>{tds}</tr>")
    return (f"<div class=\"scroll\"><table id=\"{_esc(table_id)}\"><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _summary(report: QuantReport) -> str:
    acts = [r for r in report.rows if r.kind == "activation"]
    items = [f"{len(report.rows)} quantizers: {len(report.rows) - len(acts)} weight, {len(acts)} activation"]
    finite = [r for r in report.rows if math.isfinite(r.sqnr_alone)]
    if finite:
        low = min(finite, key=lambda r: r.sqnr_alone)
        items.append(f"lowest SQNR alone: {low.name} ({cells(low)['sqnr_alone']})")
    if acts:
        clip = max(acts, key=lambda r: r.clipped)
        items.append(f"most clipped: {clip.name} ({cells(clip)['clipped']})")
    if report.detections:
        n_f, n_q = sum(d.n_float for d in report.detections), sum(d.n_int8 for d in report.detections)
        matched = sum(d.matched for d in report.detections)
        items.append(f"detections on {len(report.detections)} images: float {n_f}, INT8 {n_q}, {matched} matched "
                     f"(IoU >= {report.iou_thres:g}, same class)")
    return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def _plan_section(plan: Optional[Sequence]) -> str:
    if not plan:
        return "<p>This model carries no plan.</p>"
    convs = [e for e in plan if e.kind in ("conv", "head_conv")]
    quantized = sum(e.weight is not None for e in convs)
    notes = Counter(e.float_reason for e in plan if e.float_reason)
    items = [f"{quantized} of {len(convs)} convs quantized (weights and outputs)"]
    items += [f"{n} × {reason}" for reason, n in sorted(notes.items(), key=lambda kv: -kv[1])]
    listed = "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"
    table = _table("plan", plan.HEADER, plan.cells(), text_cols=len(plan.HEADER))
    return f"{listed}<details><summary>The plan, one row per module ({len(plan)})</summary>{table}</details>"


def _quantizer_section(report: QuantReport) -> str:
    worst = set(report.worst)
    attrs = [f" data-quantizer=\"{_esc(r.name)}\"" + (" class=\"worst\"" if r.name in worst else "")
             for r in report.rows]
    rows = [[cells(r)[key] for key in TABLE_KEYS] for r in report.rows]
    note = ("<p>Rows in red: the activations with the lowest SQNR alone (histograms below). SQNR in dB, higher "
            "is better: <i>alone</i> quantizes only this tensor, <i>accumulated</i> everything up to it. "
            "Exponent e: the range bound 2<sup>e</sup>; scale: one integer step.</p>")
    return note + _table("quantizers", [_HEADERS[k] for k in TABLE_KEYS], rows, text_cols=3, row_attrs=attrs)


def _image(data: bytes, mime: str, alt: str, caption: str) -> str:
    return (f"<figure><img src=\"{_data_uri(data, mime)}\" alt=\"{_esc(alt)}\">"
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _detection_section(report: QuantReport) -> str:
    if not report.detections:
        return "<p>No validation images were available.</p>"
    figures = [_image(_jpeg(d.image), "image/jpeg", d.file,
                      f"{d.file}: float {d.n_float} boxes, INT8 {d.n_int8} boxes, {d.matched} matched "
                      f"(IoU >= {report.iou_thres:g}, same class)") for d in report.detections]
    return ("<p>Left: the same model with fake quantization off (float); right: as quantized (INT8). "
            "Confidence 0.25, NMS IoU 0.45, as detect.py.</p>" + "".join(figures))


def _meta(report: QuantReport) -> str:
    parts = [report.title] + ([f"measured on {report.measured_on}"] if report.measured_on else [])
    parts += [f"made in {report.seconds:.1f} s"] if report.seconds else []
    return " · ".join(_esc(p) for p in parts)


def render_html(report: QuantReport) -> str:
    """The whole page as one string (UTF-8 when written); every text is HTML-escaped."""
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>Quantization report: {_esc(report.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Quantization report</h1><p class=\"meta\">{_meta(report)}</p>",
             "<h2>Summary</h2>", _summary(report),
             "<h2>Plan</h2>", _plan_section(report.plan),
             "<h2>Quantizers</h2>", _quantizer_section(report)]
    if "layers" in report.charts:
        parts += ["<h2>SQNR and clipping per layer</h2>",
                  _image(report.charts["layers"], "image/png", "SQNR and clipping per quantizer",
                         "Left: SQNR alone and accumulated per quantizer; right: the fraction of values clipped.")]
    if "histograms" in report.charts:
        parts += ["<h2>Activations of the worst layers</h2>",
                  _image(report.charts["histograms"], "image/png", "activation histograms",
                         "The float model's values at each quantizer (log counts); dashed: the range its "
                         "integer grid holds. Values outside it are clipped.")]
    parts += ["<h2>Float vs INT8 detections</h2>", _detection_section(report)]
    if report.files:
        parts += ["<h2>Files</h2><ul>" + "".join(f"<li>{_esc(f)}</li>" for f in report.files) + "</ul>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)
