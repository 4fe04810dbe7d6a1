"""Faults from outside the process: SIGKILL while a checkpoint is written, SIGKILL mid-training then
--resume, SIGINT, and an unwritable run folder; each through a real train.py subprocess.

Non-finite losses are covered in tests/test_train.py (test_nonfinite_steps_are_skipped_and_counted,
test_all_nonfinite_stops_and_keeps_loadable_last) and not repeated here.
"""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.data.synthetic import make_synthetic_dataset
from utils.train.callbacks import RESULT_KEYS, ResultsLogger

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals needed")

# Child process: save a ~4 MB checkpoint over and over to the same last.pt; every tensor value
# equals the epoch it was saved at, so a half-written file can not pass as a complete one.
_SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from utils.checkpoint import save_checkpoint
start = int(sys.argv[1])
for epoch in range(start, start + 100000):
    save_checkpoint({{"epoch": epoch, "w": torch.full((1_000_000,), float(epoch))}}, sys.argv[2])
    print(epoch, flush=True)
"""


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=16, n_val=8, img_size=64)


def _train_cmd(data: Path, project: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--data", str(data), "--cfg", "yolov5p.yaml", "--weights", "",
            "--act", "relu", "--img", "64", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--project", str(project), "--name", "r", "--noplots", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll until ``path`` exists; fail if the process ended first or it takes too long."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process exited ({proc.returncode}) before {path} appeared"
        assert time.monotonic() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_checkpoint_write_keeps_last_complete(tmp_path):
    last, rng = tmp_path / "last.pt", random.Random(0)
    script = _SAVER.format(repo=str(REPO))
    start = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(start), str(last)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == str(start), "saver did not start"  # first save is done
        time.sleep(rng.uniform(0.0, 0.3))  # lands inside torch.save, fsync or rename at random
        _kill(proc)
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        epoch = ckpt["epoch"]
        assert isinstance(epoch, int) and epoch >= start
        w = ckpt["w"]
        assert w.numel() == 1_000_000 and torch.all(w == float(epoch)), "last.pt holds a torn write"
        start = epoch + 1000  # the next round's epochs differ from every earlier one
    # Leftover temp files are dot-files ending in .tmp: nothing that globs for *.pt can pick one up.
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]
    assert all(p.name.startswith(".last.pt.") and p.suffix == ".tmp"
               for p in tmp_path.iterdir() if p.name != "last.pt")


def _epochs(results_csv: Path) -> list[int]:
    with open(results_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0].strip() == "epoch"
    return [int(float(r[0])) for r in rows[1:]]


def test_sigkill_mid_training_then_resume_finishes(tmp_path, data_yaml):
    proc = subprocess.Popen(_train_cmd(data_yaml, tmp_path, "--epochs", "3"), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "r" / "weights" / "last.pt"
    _wait_for(last, proc)  # epoch 0 is saved; epoch 1 is under way
    _kill(proc)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] < 2
    done = subprocess.run([sys.executable, "train.py", "--resume", str(last)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _epochs(tmp_path / "r" / "results.csv") == [0, 1, 2]
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["optimizer"] is None  # finished: stripped as upstream does, nothing left to resume


def test_sigint_exits_cleanly_with_resume_hint(tmp_path, data_yaml):
    proc = subprocess.Popen(_train_cmd(data_yaml, tmp_path, "--epochs", "3"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "r" / "weights" / "last.pt"
    _wait_for(last, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 1), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] < 2 and ckpt["optimizer"] is not None
    assert f"--resume {last}" in out + err


def test_unwritable_project_fails_in_one_line_before_training(tmp_path, data_yaml):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = subprocess.run(_train_cmd(data_yaml, blocker / "sub", "--epochs", "1"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(blocker) in errors[0], errors
    assert "Epoch" not in output and "Traceback" not in output


def test_repeated_epoch_replaces_its_results_row(tmp_path):
    # SIGKILL between writing epoch 1's row and saving last.pt: the resume repeats epoch 1
    log = ResultsLogger(tmp_path, tensorboard=False)
    for epoch in (0, 1, 1, 2):
        log.log_epoch(epoch, [float(epoch)] * len(RESULT_KEYS))
    assert _epochs(tmp_path / "results.csv") == [0, 1, 2]
