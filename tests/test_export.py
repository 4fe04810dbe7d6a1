"""export.py and the ONNX backend: files match PyTorch in onnxruntime, carry metadata, validate like torch."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import onnx
import onnxruntime as ort

import export  # noqa: E402
from utils.export.job import export_weights, names_from_data, normalise_imgsz  # noqa: E402
from utils.export.onnx_backend import (decode_raw_maps, import_optional, load_onnx_model, parse_metadata,  # noqa: E402
                                       session_options)
from utils.export.onnx_check import FLOAT_TOL, compare_outputs  # noqa: E402
from utils.export.onnx_export import ExportError, check_include, simplify_onnx  # noqa: E402
from utils.qat import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _export(tmp_path_factory, shared_dir, name: str, **kwargs):
    folder = tmp_path_factory.mktemp(name)
    weights = Path(shutil.copy(shared_dir / "weights" / "yolov5n.pt", folder / "yolov5n.pt"))
    images = [shared_dir / "images" / "bus.jpg", shared_dir / "images" / "zidane.jpg"]
    return export_weights(weights, check_images=images, **kwargs), weights


@pytest.fixture(scope="module")
def static320(tmp_path_factory, shared_dir):
    return _export(tmp_path_factory, shared_dir, "static", imgsz=320, fixed_shape=True)


@pytest.fixture(scope="module")
def default320(tmp_path_factory, shared_dir):
    return _export(tmp_path_factory, shared_dir, "default", imgsz=320)


@pytest.fixture(scope="module")
def dynamic256(tmp_path_factory, shared_dir):
    return _export(tmp_path_factory, shared_dir, "dynamic", imgsz=256, dynamic=True)


@pytest.fixture(scope="module")
def raw320(tmp_path_factory, shared_dir):
    return _export(tmp_path_factory, shared_dir, "raw", imgsz=320, raw_head=True)


@pytest.fixture(scope="module")
def torch_model(shared_dir):
    return load_model(shared_dir / "weights" / "yolov5n.pt", fuse=True)[0]


def _session(file):
    return ort.InferenceSession(str(file), session_options(ort), providers=["CPUExecutionProvider"])


def test_static_export_file_metadata_and_check(static320, torch_model):
    result, weights = static320
    assert result.file == weights.with_suffix(".onnx") and result.file.is_file()
    model = onnx.load(str(result.file))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["stride"] == "32" and props["producer"] == "yolov5-pow2-qat"
    assert eval(props["names"], {})[0] == "person"  # upstream's tools eval() this literal
    assert json.loads(props["imgsz"]) == [320, 320] and props["batch"] == "1"
    assert json.loads(props["raw_head"]) is False and json.loads(props["strides"]) == [8, 16, 32]
    assert all(c.passed and c.max_abs < 1e-2 for c in result.checks)
    session = _session(result.file)
    assert session.get_inputs()[0].shape == [1, 3, 320, 320]
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {"images": x.numpy()})
    assert got[0].shape == (1, 6300, 85)
    with torch.no_grad():
        ref = torch_model(x)[0].numpy()
    max_abs, max_scaled = compare_outputs([ref], got)
    assert max_scaled < 1e-4 and max_abs < 5e-3


def test_dynamic_export_runs_other_batches_and_sizes(dynamic256, torch_model):
    result, _ = dynamic256
    assert len(result.checks) == 2 and result.checks[1].shape == (2, 3, 256, 224)
    session = _session(result.file)
    assert [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape] == [None, 3, None, None]
    for shape in ((2, 3, 256, 320), (3, 3, 192, 128)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = torch_model(x)[0].numpy()
        got = session.run(None, {"images": x.numpy()})
        assert got[0].shape == ref.shape
        assert compare_outputs([ref], got)[1] < 1e-4


def test_raw_head_export_shapes_and_decoding(raw320, torch_model):
    result, _ = raw320
    session = _session(result.file)
    assert [o.name for o in session.get_outputs()] == ["output0", "output1", "output2"]
    x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(2))
    raw = session.run(None, {"images": x.numpy()})
    assert [r.shape for r in raw] == [(1, 3, 40, 40, 85), (1, 3, 20, 20, 85), (1, 3, 10, 10, 85)]
    with torch.no_grad():
        ref = torch_model(x)[0]
    model, meta = load_onnx_model(result.file, "cpu")
    assert meta["raw_head"] and meta["strides"] == [8, 16, 32]
    decoded, none = model(x)
    assert none is None and compare_outputs([ref.numpy()], [decoded.numpy()])[1] < 1e-4
    anchors = torch.tensor(meta["anchors"])
    assert compare_outputs([ref.numpy()], [decode_raw_maps([torch.from_numpy(r) for r in raw], anchors,
                                                           meta["strides"]).numpy()])[1] < 1e-4


@pytest.mark.parametrize("kind", ["static", "dynamic", "default"])
def test_val_on_onnx_matches_torch(kind, static320, dynamic256, default320, torch_model, shared_dir, tmp_path):
    """Dynamic files take the rectangular batches val uses for PyTorch; a static file can only take its
    exported shape, so both models see square letterboxed batches (rect=False, as upstream's val.py
    does for every non-PyTorch backend)."""
    from utils.data.dataset import create_dataloader
    from utils.eval.evaluate import EvalOptions, evaluate

    result = {"static": static320, "dynamic": dynamic256, "default": default320}[kind][0]
    images = sorted((shared_dir / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:64]
    listing = tmp_path / "subset.txt"  # the first 64 coco128 images keep this test short
    listing.write_text("".join(f"{p}\n" for p in images))
    loader = create_dataloader(str(listing), 320, 32, 32, pad=0.5, rect=kind != "static", workers=0)[0]
    onnx_model, meta = load_onnx_model(result.file, "cpu", threads=1)
    assert meta["dynamic_hw"] == (kind != "static") and meta["nc"] == 80
    assert meta["batch"] == ("dynamic" if kind == "dynamic" else 1)  # the default keeps upstream's batch 1
    names = meta["names"]
    scores = [evaluate(m, loader, torch.device("cpu"), 80, names, EvalOptions()) for m in (torch_model, onnx_model)]
    assert scores[0].map > 0.2 and scores[0].seen == 64
    assert abs(scores[0].map - scores[1].map) <= 0.001 and abs(scores[0].map50 - scores[1].map50) <= 0.001


def test_static_model_chunks_batches_and_refuses_other_sizes(static320, torch_model):
    model, meta = load_onnx_model(static320[0].file, "cpu")
    assert meta["batch"] == 1 and not meta["dynamic_hw"]
    x = torch.rand(3, 3, 320, 320, generator=torch.Generator().manual_seed(3))
    preds, _ = model.eval().float()(x)
    with torch.no_grad():
        ref = torch_model(x)[0]
    assert preds.shape == (3, 6300, 85) and compare_outputs([ref.numpy()], [preds.numpy()])[1] < 1e-4
    with pytest.raises(ValueError, match="static ONNX model takes 320x320"):
        model(torch.zeros(1, 3, 256, 320))
    with pytest.raises(ValueError, match="augmentation"):
        model(x, augment=True)


def test_metadata_of_upstream_files_is_understood():
    meta = parse_metadata({"stride": "32", "names": "{0: 'person', 1: 'bicycle'}"},
                          [1, 3, 640, 640], [[1, 25200, 7]], "up.onnx")
    assert meta["names"] == {0: "person", 1: "bicycle"} and meta["nc"] == 2 and meta["stride"] == 32
    assert meta["imgsz"] == [640, 640] and meta["batch"] == 1 and not meta["raw_head"]
    dyn = parse_metadata({}, ["batch", 3, "height", "width"], [["batch", "anchors", 85]], "dyn.onnx")
    assert dyn["batch"] == "dynamic" and dyn["dynamic_hw"] and dyn["nc"] == 80
    with pytest.raises(ValueError, match="anchors"):
        parse_metadata({"raw_head": "true", "nc": "80"}, [1, 3, 64, 64], [[1, 3, 8, 8, 85]], "raw.onnx")


def test_tolerance_rule_scales_per_column():
    ref = np.zeros((1, 2, 6), np.float32)
    ref[..., :4] = 320.0  # box columns: scale 320
    got = ref.copy()
    got[..., 0] += 0.3  # 0.3 px at 320 -> scaled 0.00094, within 1e-3
    assert compare_outputs([ref], [got])[1] <= FLOAT_TOL
    got[..., 5] += 0.002  # a probability off by 0.002 -> scaled 0.002, fails
    max_abs, max_scaled = compare_outputs([ref], [got])
    assert max_scaled > FLOAT_TOL and max_abs == pytest.approx(0.3, abs=1e-4)
    with pytest.raises(ValueError, match="shape"):
        compare_outputs([ref], [ref[:, :1]])


def test_disagreement_fails_loudly(tmp_path, shared_dir, monkeypatch, caplog):
    import utils.export.onnx_check as onnx_check

    weights = Path(shutil.copy(shared_dir / "weights" / "yolov5n.pt", tmp_path / "yolov5n.pt"))
    real = onnx_check._torch_outputs
    monkeypatch.setattr(onnx_check, "_torch_outputs", lambda w, x: [o + 0.5 for o in real(w, x)])
    rc = export.main(export.parse_opt(["--weights", str(weights), "--img", "64", "--check-images"]))
    assert rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "max abs diff 0.5" in errors[0] and "disagrees" in errors[0]


@pytest.mark.parametrize("args,message", [
    (["--weights", "{tmp}/missing.pt"], "checkpoint file not found"),
    (["--weights", "{tmp}/notes.pt"], "checkpoint"),
    (["--weights", "{w}", "--include", "tflite"], "supported formats: onnx"),
    (["--weights", "{w}", "--img", "300"], "not a positive multiple of the model's max stride 32"),
    (["--weights", "{w}", "--half"], "--half needs a CUDA device"),
    (["--weights", "{w}", "--opset", "7"], "opsets 11-20"),
])
def test_cli_bad_input_one_line_exit_1(args, message, tmp_path, shared_dir, caplog):
    weights = shutil.copy(shared_dir / "weights" / "yolov5n.pt", tmp_path / "w.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    argv = [a.format(tmp=tmp_path, w=weights) for a in args]
    assert export.main(export.parse_opt(argv)) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "w.onnx").exists()


def test_cli_argparse_error_and_subprocess_without_traceback(tmp_path):
    with pytest.raises(SystemExit) as info:
        export.parse_opt(["--img", "abc"])
    assert info.value.code == 2
    proc = subprocess.run([sys.executable, str(REPO / "export.py"), "--weights", str(tmp_path / "none.pt")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "none.pt: checkpoint file not found" in proc.stderr


def test_argument_helpers():
    assert normalise_imgsz(320, 32) == (320, 320) and normalise_imgsz([320, 256], 32) == (320, 256)
    with pytest.raises(ExportError, match="try 320"):
        normalise_imgsz([300], 32)
    assert check_include(["ONNX"]) == ["onnx"]
    with pytest.raises(ExportError, match="engine"):
        check_include(["engine"])


def test_names_from_data(coco128_yaml, tmp_path):
    assert names_from_data(coco128_yaml, 80)[79] == "toothbrush"
    with pytest.raises(ExportError, match="80 class names but the model has 3"):
        names_from_data(coco128_yaml, 3)


def test_missing_onnxruntime_is_one_clear_line(monkeypatch, static320):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        load_onnx_model(static320[0].file, "cpu")
    with pytest.raises(ImportError, match="pip install onnx$"):
        monkeypatch.setitem(sys.modules, "onnx", None)
        import_optional("onnx", "ONNX export")


def test_simplify_uses_onnxslim_when_present_else_warns(static320, tmp_path, monkeypatch, caplog):
    file = Path(shutil.copy(static320[0].file, tmp_path / "m.onnx"))
    monkeypatch.setitem(sys.modules, "onnxslim", None)
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    assert simplify_onnx(file) is False and "simplify skipped" in caplog.text
    calls = []
    monkeypatch.setitem(sys.modules, "onnxslim", types.SimpleNamespace(slim=lambda m: calls.append(1) or m))
    assert simplify_onnx(file) is True and calls == [1]
    onnx.checker.check_model(onnx.load(str(file)))


def test_bench_onnx_latency(static320, dynamic256, tmp_path):
    from bench import onnx_latency

    out = tmp_path / "bench.json"
    rows = onnx_latency.run(onnx=[static320[0].file, dynamic256[0].file], iters=2, warmup=1, threads=1,
                            imgsz=128, json_out=out)
    assert rows[0]["shape"] == [1, 3, 320, 320] and rows[1]["shape"] == [1, 3, 128, 128]
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_first"] == 1.0 and json.loads(out.read_text())[1]["quant"] is None


def test_val_speed_line_shows_the_shape_that_ran(static320, coco128_yaml, shared_dir, tmp_path, caplog):
    """A static batch-1 file runs (1, 3, 320, 320) whatever --batch-size is; PyTorch runs the rect batches."""
    import val

    caplog.set_level(logging.INFO)
    images = sorted((shared_dir / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:6]
    (tmp_path / "six.txt").write_text("".join(f"{p}\n" for p in images))
    data = tmp_path / "six.yaml"
    data.write_text(coco128_yaml.read_text().replace("val: images/train2017", f"val: {tmp_path / 'six.txt'}"))
    for weights, shape in ((static320[0].file, "(1, 3, 320, 320)"), (static320[1], "(4, 3, 256, 352)")):
        caplog.clear()
        val.run(data=data, weights=weights, batch_size=4, imgsz=320, workers=0, plots=False, project=tmp_path)
        assert f"per image at shape {shape}" in caplog.text, [r.getMessage() for r in caplog.records][-3:]
