"""Robustness against a full disk while a checkpoint is written: the earlier checkpoint stays intact and
the error is one line saying the disk is full, where, and which checkpoint is still good (library and
train.py). The full disk is simulated by a file whose writes fail with ENOSPC, as a full filesystem's do."""
from __future__ import annotations

import errno
import io
import logging

import pytest
import torch

import train
import utils.checkpoint as checkpoint_mod
from models.yolo import DetectionModel
from utils.checkpoint import CheckpointWriteError, load_checkpoint, make_checkpoint, save_checkpoint
from utils.data.synthetic import make_synthetic_dataset


class _FullDisk:
    """Stands in for ``open`` in utils.checkpoint: the first ``ok`` files write normally, later ones fail
    with ENOSPC after a few bytes."""

    def __init__(self, ok: int = 0):
        self.ok, self.opened = ok, 0

    def __call__(self, file, mode="r", *args, **kwargs):
        self.opened += 1
        if self.opened <= self.ok:
            return open(file, mode, *args, **kwargs)
        return _FailingFile(file, mode)


class _FailingFile(io.FileIO):
    def write(self, b) -> int:
        if self.tell() + len(b) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


@pytest.fixture(scope="module")
def model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5p.yaml", nc=3)


def test_disk_full_keeps_previous_checkpoint_and_says_so(tmp_path, model, monkeypatch):
    last = save_checkpoint(make_checkpoint(model, epoch=0), tmp_path / "last.pt")
    before = last.read_bytes()
    monkeypatch.setattr(checkpoint_mod, "open", _FullDisk(), raising=False)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(make_checkpoint(model, epoch=1), last)
    text = str(err.value)
    assert text.startswith(f"{last}: disk full while writing the checkpoint") and "\n" not in text
    assert "the previous last.pt" in text and "is intact" in text
    assert last.read_bytes() == before and load_checkpoint(last)["epoch"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_disk_full_without_earlier_checkpoint(tmp_path, model, monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "open", _FullDisk(), raising=False)
    with pytest.raises(CheckpointWriteError, match="no earlier best.pt exists"):
        save_checkpoint(make_checkpoint(model), tmp_path / "best.pt")


def test_disk_full_during_training_is_one_line_and_keeps_last(tmp_path, monkeypatch, caplog):
    data = make_synthetic_dataset(tmp_path / "syn", n_train=4, n_val=4, img_size=64)
    # epoch 0 writes last.pt and best.pt; the disk is full from the next checkpoint on
    monkeypatch.setattr(checkpoint_mod, "open", _FullDisk(ok=2), raising=False)
    opt = train.parse_opt(["--data", str(data), "--cfg", "yolov5p.yaml", "--weights", "", "--imgsz", "64",
                           "--epochs", "3", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--noplots",
                           "--project", str(tmp_path / "runs")])
    with caplog.at_level(logging.ERROR):
        assert train.main(opt) == 1
    errors = [r.getMessage() for r in caplog.records if "error:" in r.getMessage()]
    assert len(errors) == 1 and "disk full while writing the checkpoint" in errors[0]
    assert "last.pt" in errors[0] and "is intact" in errors[0]
    last = next((tmp_path / "runs").glob("*/weights/last.pt"))
    assert load_checkpoint(last)["epoch"] == 0
