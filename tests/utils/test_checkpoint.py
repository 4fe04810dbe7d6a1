"""Tests for utils/checkpoint.py: official files, refusal of unsafe pickles, our own format."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from models.common import Conv
from models.summary import model_summary
from models.yolo import DetectionModel
from utils import checkpoint as ckpt_mod
from utils.checkpoint import (CheckpointError, UnsafeCheckpointError, is_official, load_checkpoint,
                              make_checkpoint, save_checkpoint, transfer_state_dict)
from utils.qat import load_model


class _RunsCommand:
    """Pickles as a call to os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _weights(shared_dir: Path, name: str) -> Path:
    return shared_dir / "weights" / name


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", ["yolov5n.pt", "yolov5s.pt"])
def test_official_checkpoint_matches_pickled_module(shared_dir, name):
    path = _weights(shared_dir, name)
    raw = load_checkpoint(path)
    assert is_official(raw) and isinstance(raw["model"], DetectionModel)
    model, meta = load_model(path)
    assert meta["format"] == "official" and meta["nc"] == 80 and meta["weights"] == "model"
    assert meta["names"][0] == "person" and meta["stride"] == [8.0, 16.0, 32.0]
    assert not model.training and next(model.parameters()).dtype == torch.float32
    reference = raw["model"].float().eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        ours, theirs = model(x)[0], reference(x)[0]
    assert ours.shape == (2, 3 * (12 * 20 + 6 * 10 + 3 * 5), 85)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert ours[..., 4].max() > 0.01  # real weights, not a fresh init


def test_official_load_with_relu_and_fuse(shared_dir):
    path = _weights(shared_dir, "yolov5n.pt")
    relu, _ = load_model(path, act="relu")
    assert {type(m.act) for m in relu.modules() if isinstance(m, Conv)} == {nn.ReLU}
    plain, _ = load_model(path)
    fused, _ = load_model(path, fuse=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert model_summary(fused).startswith("YOLOv5n summary: 157 layers, 1867405 parameters, 0 gradients")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], fused(x)[0], atol=1e-3, rtol=1e-4)


def test_unsafe_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    bad = tmp_path / "bad.pt"
    torch.save({"model": _RunsCommand(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match=r"bad\.pt: refused to load, it pickles the unknown "
                                                    r"global '(posix|os|nt)\.system'") as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(UnsafeCheckpointError):
        load_model(bad)
    assert not marker.exists()


def test_unsafe_global_refused_by_unpickler_too(tmp_path, monkeypatch):
    """Without the static scan (and for legacy non-zip files) the restricted unpickler still refuses."""
    marker = tmp_path / "ran.txt"
    zipped, legacy = tmp_path / "zipped.pt", tmp_path / "legacy.pt"
    torch.save({"x": _RunsCommand(marker)}, zipped)
    torch.save({"x": _RunsCommand(marker)}, legacy, _use_new_zipfile_serialization=False)
    monkeypatch.setattr(ckpt_mod, "_unknown_globals", lambda path, allowed: [])
    for path in (zipped, legacy):
        with pytest.raises(UnsafeCheckpointError, match="system"):
            load_checkpoint(path)
    assert not marker.exists()


def test_damaged_and_missing_files(tmp_path, shared_dir):
    data = _weights(shared_dir, "yolov5n.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint file not found"):
        load_model(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a checkpoint dict"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither an official"):
        load_model(tmp_path / "foreign.pt")


def test_our_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3, act="relu")
    _randomize_bn(model)
    model.names = {0: "cat", 1: "dog", 2: "bird"}
    ckpt = make_checkpoint(model, epoch=7, best_fitness=0.5, hyp={"lr0": 0.01},
                           opt={"weights": tmp_path / "w.pt", "imgsz": 640})
    path = save_checkpoint(ckpt, tmp_path / "runs" / "last.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind
    plain = torch.load(path, weights_only=True)  # plain data: no allowlist needed
    assert plain["format"] == "yolov5-qat" and plain["version"] == 1 and plain["quant"] is None
    assert plain["opt"]["weights"] == str(tmp_path / "w.pt") and plain["nc"] == 3
    assert not is_official(plain)
    loaded, meta = load_model(path)
    assert meta == {"format": "yolov5-qat", "epoch": 7, "names": {0: "cat", 1: "dog", 2: "bird"},
                    "nc": 3, "stride": [8.0, 16.0, 32.0], "source": str(path), "weights": "state_dict"}
    assert {type(m.act) for m in loaded.modules() if isinstance(m, Conv)} == {nn.ReLU}
    assert loaded.yaml_file == "yolov5n.yaml"
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], loaded(x)[0])


def test_ema_weights_preferred(tmp_path):
    model = DetectionModel("yolov5n.yaml")
    ema = DetectionModel("yolov5n.yaml")
    _randomize_bn(ema)
    path = save_checkpoint(make_checkpoint(model, ema_state_dict=ema), tmp_path / "best.pt")
    loaded, meta = load_model(path)
    assert meta["weights"] == "ema_state_dict"
    assert torch.equal(loaded.model[0].bn.running_var, ema.model[0].bn.running_var)


def test_make_checkpoint_rejects_bad_fields():
    model = DetectionModel("yolov5n.yaml")
    with pytest.raises(ValueError, match="unknown fields \\['epochs'\\]"):
        make_checkpoint(model, epochs=3)
    with pytest.raises(ValueError, match="opt.device"):
        make_checkpoint(model, opt={"device": object()})


def test_state_dict_mismatch_is_reported(tmp_path):
    model = DetectionModel("yolov5n.yaml")
    ckpt = make_checkpoint(model)
    del ckpt["state_dict"]["model.3.bn.weight"]
    save_checkpoint(ckpt, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match=r"missing \['model.3.bn.weight'\]"):
        load_model(tmp_path / "missing_key.pt")
    ckpt = make_checkpoint(model)
    ckpt["model_yaml"]["width_multiple"] = 0.5  # yaml of yolov5s, weights of yolov5n
    save_checkpoint(ckpt, tmp_path / "wrong_yaml.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(tmp_path / "wrong_yaml.pt")


def test_transfer_state_dict_to_other_class_count(shared_dir):
    state = load_checkpoint(_weights(shared_dir, "yolov5n.pt"))["model"].state_dict()
    target = DetectionModel("yolov5n.yaml", nc=3)
    total = len(target.state_dict())
    assert transfer_state_dict(target, state) == total - 6  # three head convs: weight and bias
    assert torch.equal(target.model[0].conv.weight, state["model.0.conv.weight"].float())
    assert transfer_state_dict(DetectionModel("yolov5n.yaml", nc=3), state, exclude=("anchor",)) == total - 7
