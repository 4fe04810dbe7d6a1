"""Tests for train.py and utils.train.trainer: outputs, exact resume, activation choice, non-finite guard,
CLI errors and a 2-process DDP run; all on a tiny synthetic dataset at 64 px on the CPU."""
from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
import val
from utils.data.synthetic import make_synthetic_dataset
from utils.qat import load_model
from utils.train import trainer as trainer_mod
from utils.train.callbacks import RESULT_KEYS
from utils.train.loss import ComputeLoss

REPO = Path(__file__).resolve().parents[1]
BASE = dict(cfg="yolov5n.yaml", weights="", imgsz=64, batch_size=8, workers=0, device="cpu", exist_ok=False)


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=16, n_val=8, img_size=96)


def _train(tmp_path: Path, data: Path, name: str, **kw):
    args = {**BASE, "data": str(data), "project": str(tmp_path), "name": name, **kw}
    return train.run(**args)


def _ema_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_run_writes_upstream_outputs(tmp_path, data_yaml):
    results = _train(tmp_path, data_yaml, "exp", epochs=1, act="relu")
    run = tmp_path / "exp"
    for f in ("weights/last.pt", "weights/best.pt", "results.csv", "opt.yaml", "hyp.yaml", "results.png",
              "train_batch0.jpg"):
        assert (run / f).is_file(), f
    with open(run / "results.csv") as fh:
        rows = list(csv.reader(fh))
    assert [c.strip() for c in rows[0]] == ["epoch", *RESULT_KEYS]
    assert len(rows) == 2 and float(rows[1][0]) == 0
    assert len(results) == 7
    ckpt = torch.load(run / "weights/best.pt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["model.0.conv.weight"].dtype == torch.float32
    assert ckpt["names"] == {i: n for i, n in enumerate(
        ["circle", "square", "triangle", "cross", "ring", "star"])}
    model, _ = load_model(run / "weights/best.pt")
    # --act relu: every conv block was built with ReLU, and the checkpoint rebuilds it so
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    metrics, maps, _ = val.run(data=str(data_yaml), weights=str(run / "weights/best.pt"), imgsz=64, batch_size=8,
                               workers=0, device="cpu", project=str(tmp_path / "val"), plots=False)
    assert len(metrics) == 7 and len(maps) == 6


def test_resume_matches_uninterrupted_run(tmp_path, data_yaml):
    kw = dict(epochs=2, noplots=True, seed=3)
    _train(tmp_path, data_yaml, "full", **kw)
    _train(tmp_path, data_yaml, "cut", _stop_after_epoch=0, **kw)
    cut_last = tmp_path / "cut" / "weights" / "last.pt"
    mid = torch.load(cut_last, map_location="cpu", weights_only=True)
    assert mid["epoch"] == 0 and mid["optimizer"] is not None and "rng" in mid["train_state"]
    train.run(resume=str(cut_last))
    full, resumed = _ema_state(tmp_path / "full/weights/last.pt"), _ema_state(cut_last)
    assert full.keys() == resumed.keys()
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, different[:5]
    with open(tmp_path / "cut" / "results.csv") as fh:
        assert len(list(csv.reader(fh))) == 3  # header + epoch 0 + epoch 1 (appended on resume)


def test_finished_run_can_not_be_resumed(tmp_path, data_yaml):
    _train(tmp_path, data_yaml, "done", epochs=1, noplots=True, noval=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        train.run(resume=str(tmp_path / "done/weights/last.pt"))


class _NaNLoss(ComputeLoss):
    """ComputeLoss whose training-time result is NaN for the calls listed in ``bad`` (None: all)."""

    bad: set | None = set()
    calls = 0

    def __call__(self, preds, targets):
        loss, items = super().__call__(preds, targets)
        if isinstance(preds, list) and preds[0].requires_grad:  # training forward, not validation
            type(self).calls += 1
            if self.bad is None or type(self).calls in self.bad:
                loss = loss * float("nan")
        return loss, items


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, data_yaml, monkeypatch, caplog):
    cls = type("Some", (_NaNLoss,), {"bad": {2, 3}, "calls": 0})
    monkeypatch.setattr(trainer_mod, "ComputeLoss", cls)
    with caplog.at_level(logging.WARNING, logger="utils"):
        _train(tmp_path, data_yaml, "nan", epochs=1, batch_size=4, noplots=True, rect=True)
    skipped = [r for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2 and "2 in total" in skipped[-1].getMessage()
    state = _ema_state(tmp_path / "nan/weights/last.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_all_nonfinite_stops_and_keeps_loadable_last(tmp_path, data_yaml, monkeypatch):
    monkeypatch.setattr(trainer_mod, "ComputeLoss", type("All", (_NaNLoss,), {"bad": None, "calls": 0}))
    monkeypatch.setattr(trainer_mod, "NONFINITE_LIMIT", 3)
    with pytest.raises(trainer_mod.NonFiniteLossError, match="3 consecutive steps"):
        _train(tmp_path, data_yaml, "allnan", epochs=2, batch_size=4, noplots=True, noval=True)
    model, meta = load_model(tmp_path / "allnan/weights/last.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _InterruptingLoss(ComputeLoss):
    """Sends this process a SIGINT during the first training step."""

    def __call__(self, preds, targets):
        if isinstance(preds, list) and preds[0].requires_grad and not getattr(type(self), "sent", False):
            type(self).sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(preds, targets)


def test_sigint_saves_last_and_resumes(tmp_path, data_yaml, monkeypatch):
    monkeypatch.setattr(trainer_mod, "ComputeLoss", type("Stop", (_InterruptingLoss,), {}))
    _train(tmp_path, data_yaml, "int", epochs=2, batch_size=4, noplots=True, noval=True)
    last = tmp_path / "int/weights/last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == -1 and ckpt["optimizer"] is not None  # epoch 0 was cut short
    assert not (tmp_path / "int/results.csv").exists()
    monkeypatch.setattr(trainer_mod, "ComputeLoss", ComputeLoss)
    train.run(resume=True, project=str(tmp_path))  # bare --resume: the newest last.pt under --project
    with open(tmp_path / "int/results.csv") as fh:
        assert len(list(csv.reader(fh))) == 3


def test_synthetic_yaml_is_generated_on_first_use(tmp_path):
    cfg = tmp_path / "syn.yaml"
    cfg.write_text("path: gen\ntrain: images/train\nval: images/val\nnames: [a, b, c, d, e, f]\n"
                   "synthetic: {n_train: 3, n_val: 2, img_size: 64, seed: 1}\n")
    data = trainer_mod.prepare_data(cfg)
    assert Path(data["val"]) == tmp_path / "gen" / "images" / "val"
    assert len(list((tmp_path / "gen" / "images" / "train").glob("*.jpg"))) == 3


def test_cli_errors_are_one_line(tmp_path, data_yaml, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("names: [a]\n")
    assert train.main(train.parse_opt(["--data", str(bad), "--cfg", "yolov5n.yaml", "--weights", "",
                                       "--project", str(tmp_path)])) == 1
    assert "'val:' field missing" in caplog.text
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train.main(train.parse_opt(["--data", str(data_yaml), "--cfg", "yolov5n.yaml", "--weights", "",
                                       "--project", str(blocker)])) == 1
    assert "not writable" in caplog.text
    assert train.main(train.parse_opt(["--evolve"])) == 2
    assert train.main(train.parse_opt(["--weights", str(tmp_path / "missing.pt"), "--data", str(data_yaml)])) == 1
    assert "missing.pt" in caplog.text


def test_ddp_two_processes_on_cpu(tmp_path, data_yaml):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data", str(data_yaml), "--cfg", "yolov5n.yaml", "--weights", "", "--img", "64", "--epochs", "1",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--project", str(tmp_path), "--noplots",
           "--sync-bn"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["exp"]
    assert (tmp_path / "exp/weights/last.pt").is_file()
    model, _ = load_model(tmp_path / "exp/weights/last.pt")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
