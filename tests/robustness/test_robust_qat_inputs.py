"""Robustness of QAT-related inputs: a QAT checkpoint given to train.py without --qat is refused in one
line (instead of silently training a float model), --qat-report on a model without quantizers (float
.pt or .onnx) says why it reports nothing, and a QAT config yaml that does not parse is one line."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import train
import val
from models.yolo import DetectionModel
from tiny_nets import yolov5p_checkpoints
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A float and a QAT (prepared) yolov5p checkpoint with the synthetic data's 6 classes."""
    return yolov5p_checkpoints(tmp_path_factory.mktemp("ck"))


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), "--device", "cpu", "--workers", "0",
                           "--imgsz", "64", *args], capture_output=True, text=True, timeout=180, cwd=cwd)


def test_qat_checkpoint_without_qat_flag_is_refused(tmp_path, data_yaml, ckpts):
    with pytest.raises(ValueError, match=r"qat\.pt: is a QAT .*add --qat"):
        train.run(data=str(data_yaml), weights=str(ckpts["qat"]), imgsz=64, epochs=1, batch_size=2, workers=0,
                  device="cpu", project=str(tmp_path / "runs"), noplots=True)
    proc = _run("train.py", "--data", str(data_yaml), "--weights", str(ckpts["qat"]), "--epochs", "1",
                "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "add --qat" in errors[0]
    assert not list((tmp_path / "runs").glob("*/weights/*.pt"))  # nothing was trained


def test_qat_report_on_float_checkpoint_says_why_nothing(tmp_path, data_yaml, ckpts):
    proc = _run("val.py", "--data", str(data_yaml), "--weights", str(ckpts["float"]), "--qat-report",
                "--project", str(tmp_path / "v"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if "--qat-report" in ln]
    assert len(lines) == 1 and "float model without quantizers; nothing to report" in lines[0]


def test_qat_report_on_onnx_says_why_nothing(caplog):
    model = DetectionModel("yolov5p.yaml", nc=2)
    with caplog.at_level(logging.WARNING):
        val._qat_report(model, None, "cpu", "model.onnx", Path("unused"))
    assert "model.onnx is an ONNX file" in caplog.text and "nothing to report" in caplog.text


def test_qat_config_yaml_that_does_not_parse_is_one_line(tmp_path, data_yaml, ckpts):
    bad = tmp_path / "q.yaml"
    bad.write_text("weight:\n  bits: [8\nactivation: {}\n")
    proc = _run("train.py", "--data", str(data_yaml), "--weights", str(ckpts["float"]), "--qat", "--qat-config",
                str(bad), "--epochs", "1", "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "q.yaml: not valid yaml" in errors[0]
