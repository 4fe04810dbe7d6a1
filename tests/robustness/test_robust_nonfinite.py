"""Robustness against non-finite numbers: a checkpoint whose weights hold NaN/inf is refused naming the
file and the tensor (val.py and train.py, one line, exit 1), and a run whose every step was skipped as
non-finite does not end as a success."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
import utils.train.trainer as trainer_mod
from models.yolo import DetectionModel
from utils.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from utils.data.synthetic import make_synthetic_dataset
from utils.qat import load_model
from utils.train.guard import NonFiniteLossError
from utils.train.loss import ComputeLoss

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=64)


@pytest.fixture(scope="module")
def nan_ckpt(tmp_path_factory) -> Path:
    """A yolov5p checkpoint (6 classes, as the synthetic data) with one NaN in a conv weight."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5p.yaml", nc=6)
    with torch.no_grad():
        model.model[2].cv1.conv.weight[0, 0, 0, 0] = float("nan")
    return save_checkpoint(make_checkpoint(model), tmp_path_factory.mktemp("ck") / "nan.pt")


def test_nan_weights_are_refused_naming_file_and_tensor(nan_ckpt):
    with pytest.raises(CheckpointError) as err:
        load_model(nan_ckpt)
    text = str(err.value)
    assert str(nan_ckpt) in text and "'model.2.cv1.conv.weight'" in text and "non-finite" in text


@pytest.mark.parametrize("script", ["val.py", "train.py"])
def test_nan_weights_cli_is_one_line(tmp_path, data_yaml, nan_ckpt, script):
    args = [sys.executable, str(REPO / script), "--data", str(data_yaml), "--weights", str(nan_ckpt),
            "--imgsz", "64", "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")]
    args += ["--epochs", "1"] if script == "train.py" else []
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "nan.pt" in errors[0] and "model.2.cv1.conv.weight" in errors[0]


class _AlwaysNaN(ComputeLoss):
    def __call__(self, preds, targets):
        loss, items = super().__call__(preds, targets)
        if isinstance(preds, list) and preds[0].requires_grad:  # training steps only
            loss = loss * float("nan")
        return loss, items


def test_run_whose_every_step_was_skipped_fails(tmp_path, data_yaml, monkeypatch):
    monkeypatch.setattr(trainer_mod, "ComputeLoss", _AlwaysNaN)
    opt = train.parse_opt(["--data", str(data_yaml), "--cfg", "yolov5p.yaml", "--weights", "", "--imgsz", "64",
                           "--epochs", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots",
                           "--project", str(tmp_path / "runs")])
    with pytest.raises(NonFiniteLossError, match="all 2 steps had a non-finite loss"):
        train.run(**vars(opt))
    assert train.main(opt) == 1  # the script: one line and a failing exit code, not 0
    last = sorted((tmp_path / "runs").glob("*/weights/last.pt"))[0]
    model, _ = load_model(last)  # the unchanged weights are still there and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
