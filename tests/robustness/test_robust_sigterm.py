"""Robustness against a stop request from outside: SIGTERM (a scheduler's pre-emption, ``docker stop``)
during training saves last.pt and exits without a traceback, like Ctrl-C, so the run can be resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")


def test_sigterm_saves_last_and_resumes(tmp_path):
    data = make_synthetic_dataset(tmp_path / "syn", n_train=16, n_val=8, img_size=64)
    cmd = [sys.executable, "train.py", "--data", str(data), "--cfg", "yolov5p.yaml", "--weights", "", "--img", "64",
           "--batch-size", "2", "--workers", "0", "--device", "cpu", "--project", str(tmp_path), "--name", "r",
           "--noplots", "--epochs", "3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "r" / "weights" / "last.pt"
    end = time.monotonic() + 180
    while not last.exists():  # epoch 0 saved: epoch 1 is under way
        assert proc.poll() is None and time.monotonic() < end, "training ended before last.pt appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM received" in err and f"--resume {last}" in out + err
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] < 2 and ckpt["optimizer"] is not None  # resumable
