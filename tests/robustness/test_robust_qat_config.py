"""QAT configs that do what they say: a user's file layers on the shipped recipe (a file of `rules:` only
trains), every value is type- and range-checked where the config is built, and a rule that matches no
layer is an error naming it and its near matches, before any work starts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.yolo import DetectionModel
from quant.config import QuantConfig
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.data.synthetic import make_synthetic_dataset
from utils.qat import DEFAULT_QAT_CONFIG, load_quant_config, prepare_qat_model

REPO = Path(__file__).resolve().parents[2]


def _model() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5p.yaml", nc=2, act="relu")


def test_rules_only_file_keeps_the_shipped_recipe(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("rules:\n  - pattern: 'model.0'\n    float: true\n")
    cfg = load_quant_config(user)
    shipped = load_quant_config(DEFAULT_QAT_CONFIG)
    assert cfg.weight == shipped.weight and cfg.activation == shipped.activation
    assert cfg.leaf_modules == ("Detect",) and cfg.bias_correction == shipped.bias_correction
    assert [r.pattern for r in cfg.rules] == ["model.0"]
    prepared = prepare_qat_model(_model(), 64, user)
    out = prepared.eval()(torch.zeros(1, 3, 64, 64))
    assert len(out[1]) == 3  # three head maps: Detect stayed a leaf (was "expected 3 prediction maps, got 16")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_quant_config(empty) == shipped


def test_detect_stays_a_leaf_even_when_a_config_drops_it():
    cfg = QuantConfig.from_dict({"leaf_modules": []})
    prepared = prepare_qat_model(_model(), 64, cfg)
    assert "Detect" in prepared.quant_config.leaf_modules
    assert len(prepared.eval()(torch.zeros(1, 3, 64, 64))[1]) == 3


@pytest.mark.parametrize("data, match", [
    ({"rules": [{"pattern": "model.0", "float": "no"}]}, r"'model.0': float must be true or false, got 'no'"),
    ({"activation": {"fixed_exponent": 200}}, r"fixed_exponent must be an int in \[-32, 32\] or null, got 200"),
    ({"activation": {"fixed_exponent": -200}}, r"fixed_exponent must be an int in \[-32, 32\]"),
    ({"weight": {"per_channel": "yes"}}, r"per_channel must be true or false"),
    ({"activation": {"bits": 40}}, r"bits must be an int in \[2, 16\]"),
    ({"bias_correction": 1}, r"bias_correction must be true or false"),
])
def test_bad_values_are_refused_where_the_config_is_built(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict(data, source="q.yaml")


def _config_file(tmp_path, rules: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n" + rules)
    return path


def test_a_rule_that_matches_nothing_names_itself_and_near_matches(tmp_path):
    typo = _config_file(tmp_path, "  - pattern: 'model.24.m.9'\n    float: true\n")
    with pytest.raises(ValueError, match=r"rule 'model.24.m.9' matches no layer .*near matches: model.24.m.2, "
                                         r"model.24.m.1, model.24.m.0"):
        prepare_qat_model(_model(), 64, str(typo))
    beyond = _config_file(tmp_path, "  - pattern: 'layer:40'\n    float: true\n")
    with pytest.raises(ValueError, match=r"rule 'layer:40' matches no layer .*layer indices here: 0\.\.24"):
        prepare_qat_model(_model(), 64, beyond)
    fine = _config_file(tmp_path, "  - pattern: 'model.24.*'\n    activation: {bits: 16}\n"
                                  "  - pattern: 'layer:3'\n    float: true\n")
    prepare_qat_model(_model(), 64, fine)  # these match


def test_saved_configs_rebuild_on_other_models():
    """A config object (e.g. read back from a checkpoint) is not checked: the shipped default's
    'layer:24' head rule matches nothing on a shorter custom model, and that is fine."""
    torch.manual_seed(0)
    small = DetectionModel({"nc": 2, "depth_multiple": 0.33, "width_multiple": 0.125, "anchors": 3,
                            "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]]],
                            "head": [[[-1], 1, "Detect", ["nc", "anchors"]]], "activation": "relu"})
    prepare_qat_model(small, 64, load_quant_config(DEFAULT_QAT_CONFIG))


def test_train_refuses_a_typo_rule_before_training(tmp_path):
    data = make_synthetic_dataset(tmp_path / "syn", n_train=4, n_val=4, img_size=64)
    weights = save_checkpoint(make_checkpoint(_model()), tmp_path / "float.pt")
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("rules:\n  - pattern: 'model.24.m.7'\n    float: true\n")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--qat", "--weights", str(weights), "--data",
                           str(data), "--qat-config", str(cfg), "--imgsz", "64", "--epochs", "1", "--device", "cpu",
                           "--workers", "0", "--project", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and "'model.24.m.7' matches no layer" in errors[0]
    assert not list((tmp_path / "runs").glob("*/weights/*.pt"))
