"""Robustness against bad model and hyperparameter yaml files: unknown blocks are refused by
name (never evaluated), a hyp file with a missing key stops with one line naming it, and one
with an unknown key trains on with a warning naming the key."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
from models.yolo import DetectionModel
from utils.data.synthetic import make_synthetic_dataset
from utils.train.setup import REQUIRED_HYP_KEYS, check_hyp

REPO = Path(__file__).resolve().parents[2]
HYP = REPO / "data/hyps/hyp.scratch-low.yaml"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=64)


def _model_yaml(tmp_path: Path, module: str) -> Path:
    cfg = yaml.safe_load((REPO / "models/yolov5p.yaml").read_text())
    cfg["backbone"][1] = [-1, 1, module, [128, 3, 2]]
    out = tmp_path / "bad_model.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@pytest.mark.parametrize("module", ["NoSuchBlock", "__import__('os').system('touch {marker}')",
                                    "eval", "nn.Module"])
def test_unknown_model_block_is_refused_without_eval(tmp_path, module):
    marker = tmp_path / "marker"
    name = module.format(marker=marker)
    cfg = _model_yaml(tmp_path, name)
    with pytest.raises(ValueError) as err:
        DetectionModel(str(cfg), nc=3)
    text = str(err.value)
    assert "layer 1" in text and "unknown module" in text and repr(name) in text and "\n" not in text
    assert not marker.exists()


def test_unknown_model_block_cli_is_one_line(tmp_path, data_yaml):
    marker = tmp_path / "marker"
    cfg = _model_yaml(tmp_path, f"__import__('os').system('touch {marker}')")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(data_yaml), "--cfg", str(cfg),
                           "--weights", "", "--imgsz", "64", "--epochs", "1", "--workers", "0", "--device", "cpu",
                           "--project", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "unknown module" in errors[0] and "bad_model.yaml" in errors[0]
    assert not marker.exists()


def test_required_hyp_keys_match_the_default_file():
    assert set(REQUIRED_HYP_KEYS) == set(yaml.safe_load(HYP.read_text()))


def _hyp_file(tmp_path: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> Path:
    hyp = yaml.safe_load(HYP.read_text())
    for k in drop:
        del hyp[k]
    hyp.update(add or {})
    out = tmp_path / "hyp.custom.yaml"
    out.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return out


def test_hyp_missing_keys_is_one_line_error(tmp_path):
    hyp = yaml.safe_load(_hyp_file(tmp_path, drop=("lr0", "mosaic")).read_text())
    with pytest.raises(ValueError) as err:
        check_hyp(hyp, "hyp.custom.yaml")
    text = str(err.value)
    assert "hyp.custom.yaml" in text and "'lr0'" in text and "'mosaic'" in text and "\n" not in text
    with pytest.raises(ValueError, match="mapping"):
        check_hyp(["lr0", 0.01], "list.yaml")


def test_hyp_missing_key_stops_train_cli(tmp_path, data_yaml):
    hyp = _hyp_file(tmp_path, drop=("warmup_epochs",))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(data_yaml), "--cfg", "yolov5p.yaml",
                           "--hyp", str(hyp), "--weights", "", "--imgsz", "64", "--epochs", "1", "--workers", "0",
                           "--device", "cpu", "--project", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "warmup_epochs" in errors[0] and str(hyp) in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/weights/last.pt"))


def test_hyp_unknown_key_warns_and_trains(tmp_path, data_yaml, caplog):
    hyp = _hyp_file(tmp_path, add={"lr_0": 0.5, "mosiac": 1.0})
    caplog.set_level(logging.INFO)
    train.run(data=str(data_yaml), cfg="yolov5p.yaml", hyp=str(hyp), weights="", imgsz=64, epochs=1,
              batch_size=4, workers=0, device="cpu", project=str(tmp_path / "runs"), name="exp", noplots=True)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "unknown hyperparameters" in r.getMessage()]
    assert len(warned) == 1 and "'lr_0'" in warned[0] and "'mosiac'" in warned[0] and str(hyp) in warned[0]
    assert (tmp_path / "runs/exp/weights/last.pt").is_file()
    # optional keys are not reported
    caplog.clear()
    check_hyp({**yaml.safe_load(HYP.read_text()), "anchors": 3, "label_smoothing": 0.1}, "h.yaml")
    qat_hyp = REPO / "data/hyps/hyp.qat.yaml"  # every key of the shipped QAT recipe is read
    check_hyp(yaml.safe_load(qat_hyp.read_text()), qat_hyp)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("row", [[-1, 1, "Conv", ["__import__('os').system('touch {marker}')", 3, 2]],
                                 [-1, 1, "nn.MaxPool2d", ["__import__('os').system('touch {marker}')"]]])
def test_code_in_model_args_is_never_evaluated(tmp_path, row):
    marker = tmp_path / "marker"
    cfg = yaml.safe_load((REPO / "models/yolov5p.yaml").read_text())
    cfg["backbone"][1] = [row[0], row[1], row[2], [a.format(marker=marker) if isinstance(a, str) else a
                                                    for a in row[3]]]
    path = tmp_path / "bad_args.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(ValueError) as err:
        DetectionModel(str(path), nc=3)
    text = str(err.value)  # refused at build ('layer 1') or at the stride-probing forward
    assert "bad_args.yaml" in text and ("layer 1" in text or "does not run" in text) and "\n" not in text
    assert not marker.exists()
