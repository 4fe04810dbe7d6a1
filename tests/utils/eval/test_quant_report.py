"""The quantization report (utils/eval/quant_report.py, utils/eval/quant_report_html.py): val.py --qat-report on a
tiny calibrated QAT yolov5p (and with --ptq) writes quant_report.html whose quantizer table holds every
quantizer with the very cells of the printed table and of quant_layers.csv, whose images all decode, and
which stays small; rendering escapes text; a failing report only warns."""
from __future__ import annotations

import base64
import csv
import dataclasses
import logging
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import val
from quant.layer_error import COLUMNS, LayerError, cells
from quant.schedule import iter_quantizers
from tiny_nets import yolov5p_checkpoints
from utils.data.synthetic import make_synthetic_dataset
from utils.eval.quant_report import HTML_NAME, float_vs_int8, try_report_quantization, worst_activations
from utils.eval.quant_report_html import TABLE_KEYS, QuantReport, render_html
from utils.qat import load_model

IMGSZ = 64
VAL = dict(imgsz=IMGSZ, batch_size=4, workers=0, device="cpu", plots=False, qat_report=True)


class _Page(HTMLParser):
    """The quantizer table's rows (data-quantizer -> cell texts), every <img> src and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.srcs: list[str] = []
        self.text: list[str] = []
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-quantizer" in attrs:
            self._row = attrs["data-quantizer"]
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.srcs.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[self._row].append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _decode_image(src: str, folder: Path) -> np.ndarray:
    if src.startswith("data:"):
        head, payload = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
        data = base64.b64decode(payload, validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"
    else:
        data = (folder / src).read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.size > 0
    return image


def _printed_cells(log: str, n_rows: int) -> dict[str, dict[str, str]]:
    """The printed table's rows, cut at the column widths of quant.layer_error.COLUMNS."""
    head = " ".join(h.ljust(-w) if w < 0 else h.rjust(w) for _, h, w in COLUMNS).rstrip()
    out = {}
    for line in log[log.index(head):].splitlines()[2:2 + n_rows]:
        pos, row = 0, {}
        for key, _, width in COLUMNS:
            row[key] = line[pos:pos + abs(width)].strip()
            pos += abs(width) + 1
        out[row["name"]] = row
    return out


def _csv_rows(path: Path) -> list[LayerError]:
    types = {f.name: f.type for f in dataclasses.fields(LayerError)}
    convert = {"int": int, "float": float, "str": str, "bool": lambda v: v == "True"}
    with open(path, newline="", encoding="utf-8") as f:
        return [LayerError(**{k: convert[types[k]](v) for k, v in r.items()}) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=96)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A float ReLU yolov5p and its QAT version calibrated on random images (6 classes, 64 px); the QAT
    file's name needs escaping in HTML."""
    paths = yolov5p_checkpoints(tmp_path_factory.mktemp("ck"), IMGSZ, calib_images=4)
    return {"float": paths["float"], "qat": paths["qat"].rename(paths["qat"].with_name("qat <&>.pt"))}


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, data_yaml, ckpts) -> tuple[Path, str]:
    """(run folder, log) of val.py --qat-report on the QAT checkpoint."""
    project = tmp_path_factory.mktemp("val")
    handler = _Capture()
    logging.getLogger().addHandler(handler)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    try:
        val.run(data=str(data_yaml), weights=str(ckpts["qat"]), project=str(project), **VAL)
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    return project / "exp", "\n".join(handler.lines)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


# --------------------------------------------------------------------------------------------- tests
def test_val_qat_report_writes_html_csv_and_prints_paths(qat_run):
    run, log = qat_run
    for name in (HTML_NAME, "quant_layers.csv", "quant_layers.png"):
        assert (run / name).is_file(), name
    assert f"Quantization report: {run / HTML_NAME}" in log
    assert f"Quantization table: {run / 'quant_layers.csv'}" in log
    assert log.rindex("Quantization report:") > log.rindex("Results saved to")  # the closing lines
    assert (run / HTML_NAME).stat().st_size < 1_500_000


def test_html_has_a_row_per_quantizer_with_the_printed_and_csv_cells(qat_run, ckpts):
    run, log = qat_run
    page = _parse(run / HTML_NAME)
    model, _ = load_model(ckpts["qat"])
    names = [n for n, _ in iter_quantizers(model)]
    assert list(page.rows) == names  # every quantizer once, in the model's order
    printed = _printed_cells(log, len(names))
    assert list(printed) == names
    csv_rows = _csv_rows(run / "quant_layers.csv")
    assert [r.name for r in csv_rows] == names
    for row in csv_rows:
        html_cells = dict(zip(TABLE_KEYS, page.rows[row.name]))
        assert html_cells == {k: cells(row)[k] for k in TABLE_KEYS}, row.name
        assert {k: html_cells[k] for k, _, _ in COLUMNS} == printed[row.name], row.name
    assert any(c.endswith(" dB") and c != "inf dB" for cells_ in page.rows.values() for c in cells_)


def test_html_images_decode_and_sections_are_there(qat_run, data_yaml):
    run, _ = qat_run
    page = _parse(run / HTML_NAME)
    text = "".join(page.text)
    images = [_decode_image(src, run) for src in page.srcs]
    # layers chart, histograms, one picture per validation image (3 of the 4)
    assert len(images) == 2 + 3
    assert all(max(im.shape[:2]) <= 1000 for im in images[2:])  # downscaled detection pictures
    for heading in ("Plan", "Quantizers", "SQNR and clipping per layer", "Activations of the worst layers",
                    "Float vs INT8 detections"):
        assert heading in text
    assert "qat <&>.pt" in text  # the title, escaped in the source and read back by the parser
    assert "<&>" not in (run / HTML_NAME).read_text(encoding="utf-8")
    assert "conv+bn+relu" in text and "act_quant.input" in text  # the plan table
    assert "matched (IoU >= 0.5, same class)" in text


def test_ptq_report_from_a_float_checkpoint(tmp_path, data_yaml, ckpts, caplog):
    with caplog.at_level(logging.INFO):
        val.run(data=str(data_yaml), weights=str(ckpts["float"]), project=str(tmp_path), ptq=True, calib_images=4,
                **VAL)
    html_path = tmp_path / "exp" / HTML_NAME
    page = _parse(html_path)
    assert len(page.rows) > 50 and "float.pt, PTQ" in "".join(page.text)
    assert f"Quantization report: {html_path}" in caplog.text


def test_float_vs_int8_restores_flags_and_matches_itself(ckpts, data_yaml):
    model, _ = load_model(ckpts["qat"])
    for _, q in iter_quantizers(model):
        q.enable_fake_quant(False)  # INT8 side == float side: every box must match
    model.train()
    files = sorted(str(p) for p in (Path(data_yaml).parent / "images" / "val").glob("*.jpg"))[:2]
    pairs = float_vs_int8(model, files, "cpu", IMGSZ)
    assert model.training and all(int(q.fake_quant_enabled) == 0 for _, q in iter_quantizers(model))
    assert [p.file for p in pairs] == [Path(f).name for f in files]
    for p in pairs:
        assert p.n_float == p.n_int8 == p.matched
        assert p.image.ndim == 3 and p.image.dtype == np.uint8


def test_render_escapes_text_and_keeps_cells():
    row = LayerError("act_quant.<b>&x", "activation", "uint8", "2^3", 0.01234, 31.25, 20.0, 8, False, "2^-5",
                     0.0, 7.96875, -0.5, 9.0)
    page_text = render_html(QuantReport(title="<script>alert(1)</script>", rows=[row]))
    assert "<script>" not in page_text and "&lt;script&gt;" in page_text
    page = _Page()
    page.feed(page_text)
    assert page.rows == {row.name: [cells(row)[k] for k in TABLE_KEYS]}
    assert page.rows[row.name][TABLE_KEYS.index("clipped")] == "1.234%"
    assert page.rows[row.name][TABLE_KEYS.index("range")] == "[0, 7.97]"


def test_worst_activations_skip_weights_and_exact_ones():
    def row(name, kind, alone):
        return LayerError(name, kind, "int8", "2^0", 0.0, alone, alone)

    rows = [row("w", "weight", 5.0), row("a", "activation", 30.0), row("b", "activation", float("inf")),
            row("c", "activation", 12.0), row("d", "activation", 40.0)]
    assert worst_activations(rows, 2) == ["c", "a"]


def test_failed_report_is_one_warning(tmp_path, caplog):
    class _Broken:
        dataset = None

        def __iter__(self):
            raise OSError("disk gone")

    with caplog.at_level(logging.WARNING):
        assert try_report_quantization(torch.nn.Identity(), _Broken(), "cpu", tmp_path) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "quantization report not written: OSError: disk gone" in warnings[0].getMessage()
    assert not (tmp_path / HTML_NAME).exists()
