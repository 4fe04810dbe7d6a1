"""Robustness of checkpoint loading: a pickle naming a foreign global is refused without running
it, a truncated file is one clear line (library and CLI), and a checkpoint of another class count
fine-tunes by transferring only the tensors that fit."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from models.yolo import DetectionModel
from utils.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, make_checkpoint, \
    save_checkpoint
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=64)


@pytest.fixture(scope="module")
def ckpt80(tmp_path_factory) -> Path:
    """A valid checkpoint of yolov5p with 80 classes (the synthetic data has 6)."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5p.yaml", nc=80)
    return save_checkpoint(make_checkpoint(model), tmp_path_factory.mktemp("ck") / "p80.pt")


class _RunsCommand:
    """Pickles as a call to os.system: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(script: str, tmp_path: Path, data: Path, weights: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / script), "--data", str(data), "--weights", str(weights), "--imgsz", "64",
            "--workers", "0", "--device", "cpu", "--project", str(tmp_path / "runs")]
    if script == "train.py":
        args += ["--epochs", "1"]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture()
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "system_was_called"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCommand(marker), "epoch": 3}, path)
    return path, marker


def test_foreign_global_is_refused_without_running(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "evil.pt" in text and "system" in text and "\n" not in text
    assert not marker.exists()


@pytest.mark.parametrize("script", ["train.py", "val.py"])
def test_foreign_global_cli_is_one_line(tmp_path, data_yaml, evil, script):
    path, marker = evil
    line = _one_error_line(_cli(script, tmp_path, data_yaml, path))
    assert "evil.pt" in line and "refused" in line
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9])
def test_truncated_checkpoint_is_one_clear_line(tmp_path, ckpt80, fraction):
    data = ckpt80.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint_cli(tmp_path, data_yaml, ckpt80):
    path = tmp_path / "truncated.pt"
    path.write_bytes(ckpt80.read_bytes()[:5000])
    line = _one_error_line(_cli("val.py", tmp_path, data_yaml, path))
    assert "truncated.pt" in line


def test_other_class_count_transfers_matching_tensors(tmp_path, data_yaml, ckpt80, caplog):
    caplog.set_level(logging.INFO)
    train.run(data=str(data_yaml), weights=str(ckpt80), imgsz=64, epochs=1, batch_size=4, workers=0,
              device="cpu", project=str(tmp_path / "runs"), name="ft", noplots=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Transferred ")]
    assert len(lines) == 1 and str(ckpt80) in lines[0]
    moved, total = (int(x) for x in lines[0].split()[1].split("/"))
    src = torch.load(ckpt80, map_location="cpu", weights_only=True)["state_dict"]
    own = DetectionModel("yolov5p.yaml", nc=6).state_dict()
    fitting = [k for k in own if k in src and src[k].shape == own[k].shape]
    assert total == len(own) and moved == len(fitting) < total  # the 3 Detect convs (weight+bias) differ
    assert total - moved == 6
    last = torch.load(tmp_path / "runs/ft/weights/last.pt", map_location="cpu", weights_only=True)
    assert last["nc"] == 6 and last["state_dict"]["model.24.m.0.weight"].shape[0] == 3 * (5 + 6)
