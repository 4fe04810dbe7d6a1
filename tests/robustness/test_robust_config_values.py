"""Robustness of the validation layer: yaml values of the wrong type or range (dataset, hyperparameters,
model), yaml that does not parse, a dataset without a train split, and out-of-range flags all stop with
one line naming the file (or flag), the key and the allowed values, before any work starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
import val
from models.yolo import DetectionModel
from utils.config_checks import ConfigError
from utils.data.data_config import DataConfigError, load_data_config
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
HYP = REPO / "data/hyps/hyp.scratch-low.yaml"


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=4, n_val=4, img_size=64)


def _train_kwargs(tmp_path: Path, data: Path, **kw) -> dict:
    return dict(data=str(data), cfg="yolov5p.yaml", weights="", imgsz=64, epochs=1, batch_size=2, workers=0,
                device="cpu", project=str(tmp_path / "runs"), noplots=True, **kw)


def _cli(script: str, *args: str, cwd: Path) -> str:
    """Run a script; assert exit 1, no traceback, exactly one 'error:' line, and return that line."""
    proc = subprocess.run([sys.executable, str(REPO / script), "--device", "cpu", "--workers", "0", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1, errors
    return errors[0]


# -------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flag, value, words", [
    ("batch_size", 0, "--batch-size 0: must be an integer >= 1"),
    ("epochs", 0, "--epochs 0: must be an integer >= 1"),
    ("imgsz", 0, "--imgsz 0: must be an integer in [32, 8192]"),
    ("workers", -1, "--workers -1: must be an integer >= 0"),
    ("freeze", [-2], "--freeze -2: must be an integer >= 0"),
    ("label_smoothing", 1.5, "--label-smoothing 1.5"),
])
def test_out_of_range_train_flag_stops_before_any_work(tmp_path, data_yaml, flag, value, words):
    with pytest.raises(ConfigError) as err:
        train.run(**{**_train_kwargs(tmp_path, data_yaml), flag: value})
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_batch_size_and_epochs_zero_cli_are_one_line(tmp_path, data_yaml):
    common = ["--data", str(data_yaml), "--cfg", "yolov5p.yaml", "--weights", "", "--imgsz", "64",
              "--project", str(tmp_path / "runs")]
    assert "--batch-size 0" in _cli("train.py", *common, "--batch-size", "0", "--epochs", "1", cwd=tmp_path)
    assert "--epochs 0" in _cli("train.py", *common, "--epochs", "0", cwd=tmp_path)


def test_val_flags_are_range_checked(tmp_path, data_yaml):
    with pytest.raises(ConfigError, match=r"--conf-thres 2\.0: must be a number in \[0, 1\]"):
        val.run(data=str(data_yaml), weights="missing.pt", conf_thres=2.0, project=str(tmp_path / "v"))
    line = _cli("val.py", "--data", str(data_yaml), "--weights", "x.pt", "--batch-size", "0",
                "--project", str(tmp_path / "v"), cwd=tmp_path)
    assert "--batch-size 0" in line


# ---------------------------------------------------------------------------------- hyperparameters
def _hyp(tmp_path: Path, **changes) -> Path:
    hyp = yaml.safe_load(HYP.read_text())
    hyp.update(changes)
    out = tmp_path / "hyp.bad.yaml"
    out.write_text(yaml.safe_dump(hyp, sort_keys=False))
    return out


@pytest.mark.parametrize("key, value, allowed", [
    ("lr0", "abc", "a number > 0"), ("lr0", "0.01", "a number > 0"), ("momentum", 1.5, "a number in [0, 1)"),
    ("mosaic", True, "a number in [0, 1]"), ("scale", 1.0, "a number in [0, 1)"), ("lr0", float("nan"), "> 0"),
])
def test_hyp_value_of_wrong_type_or_range_names_file_key_and_range(tmp_path, data_yaml, key, value, allowed):
    hyp = _hyp(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as err:
        train.run(**_train_kwargs(tmp_path, data_yaml, hyp=str(hyp)))
    text = str(err.value)
    assert str(hyp) in text and repr(key) in text and allowed in text and "\n" not in text


def test_hyp_yaml_that_does_not_parse_is_one_line(tmp_path, data_yaml):
    hyp = tmp_path / "broken.yaml"
    hyp.write_text("lr0: 0.01\nlrf: [0.1\nmomentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid yaml \(.*line \d+"):
        train.run(**_train_kwargs(tmp_path, data_yaml, hyp=str(hyp)))
    line = _cli("train.py", "--data", str(data_yaml), "--cfg", "yolov5p.yaml", "--weights", "", "--hyp", str(hyp),
                "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert "broken.yaml: not valid yaml" in line


def test_hyp_string_number_cli_is_one_line(tmp_path, data_yaml):
    hyp = _hyp(tmp_path, lr0="0.01")
    line = _cli("train.py", "--data", str(data_yaml), "--cfg", "yolov5p.yaml", "--weights", "", "--hyp", str(hyp),
                "--epochs", "1", "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert "'lr0' must be a number > 0, got '0.01' (str)" in line


# -------------------------------------------------------------------------------------- dataset yaml
def _data(tmp_path: Path, data_yaml: Path, drop: tuple = (), **changes) -> Path:
    d = yaml.safe_load(data_yaml.read_text())
    d["path"] = str(data_yaml.parent)
    d.update(changes)
    for k in drop:
        d.pop(k, None)
    out = tmp_path / "data.bad.yaml"
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out


def test_dataset_nc_not_an_integer_names_key_and_file(tmp_path, data_yaml):
    bad = _data(tmp_path, data_yaml, nc="abc")
    with pytest.raises(DataConfigError) as err:
        load_data_config(bad)
    assert str(bad) in str(err.value) and "'nc' must be an integer >= 1, got 'abc'" in str(err.value)


@pytest.mark.parametrize("changes, words", [({"names": []}, "'names' is empty"),
                                            ({"train": 5}, "'train' must be a folder"),
                                            ({"path": ["a"]}, "'path' must be a folder name")])
def test_dataset_fields_of_the_wrong_type(tmp_path, data_yaml, changes, words):
    with pytest.raises(DataConfigError, match=words):
        load_data_config(_data(tmp_path, data_yaml, **changes))


def test_dataset_without_train_split_is_one_line(tmp_path, data_yaml):
    bad = _data(tmp_path, data_yaml, drop=("train", "synthetic"))
    with pytest.raises(DataConfigError, match=r"data\.bad\.yaml: 'train:' field missing"):
        train.run(**_train_kwargs(tmp_path, bad))
    line = _cli("train.py", "--data", str(bad), "--cfg", "yolov5p.yaml", "--weights", "", "--imgsz", "64",
                "--epochs", "1", "--project", str(tmp_path / "runs"), cwd=tmp_path)
    assert "'train:' field missing" in line


# ---------------------------------------------------------------------------------------- model yaml
def _model(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load((REPO / "models/yolov5p.yaml").read_text())
    cfg.update(changes)
    out = tmp_path / "model.bad.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@pytest.mark.parametrize("changes, words", [
    ({"nc": "abc"}, "'nc' must be an integer >= 1, got 'abc'"),
    ({"depth_multiple": "0.33"}, "'depth_multiple' must be a number > 0"),
    ({"width_multiple": 0}, "'width_multiple' must be a number > 0"),
    ({"anchors": [[10, 13, 16]]}, "'anchors' must be an integer >= 1 or one list"),
    ({"head": []}, "'head' must be a non-empty list"),
])
def test_model_yaml_field_of_wrong_type_names_file_and_key(tmp_path, changes, words):
    cfg = _model(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        DetectionModel(str(cfg))
    assert str(cfg) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_model_yaml_layer_number_not_an_integer(tmp_path):
    cfg = yaml.safe_load((REPO / "models/yolov5p.yaml").read_text())
    cfg["backbone"][2][1] = "three"
    out = tmp_path / "m.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(ConfigError, match=r"m\.yaml: 'layer 2 number' must be an integer >= 1, got 'three'"):
        DetectionModel(str(out))


def test_model_yaml_that_does_not_parse(tmp_path):
    out = tmp_path / "m.yaml"
    out.write_text("nc: 3\nbackbone: [[-1, 1, Conv, [16, 3]]\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: not valid yaml"):
        DetectionModel(str(out))


def test_freeze_of_every_layer_is_one_line(tmp_path, data_yaml):
    with pytest.raises(ValueError, match=r"--freeze 30: freezes every layer of the model \(25 layers\)"):
        train.run(**_train_kwargs(tmp_path, data_yaml, freeze=[30]))
