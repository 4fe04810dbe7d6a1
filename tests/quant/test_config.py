"""QuantConfig: yaml round trips, error messages, rule resolution order."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from quant.config import LayerRule, QuantConfig, QuantSpec

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "data" / "quant").glob("*.yaml"))


def test_defaults_follow_design():
    cfg = QuantConfig()
    assert cfg.weight.per_channel and cfg.weight.signed is True and cfg.weight.bits == 8
    assert cfg.activation.signed is None and not cfg.activation.per_channel
    assert cfg.input.signed is False and cfg.input.fixed_exponent == 0
    assert cfg.resolve("anything", 3) == (True, cfg.weight, cfg.activation)


def test_yaml_round_trip(tmp_path):
    cfg = QuantConfig(
        weight=QuantSpec(bits=4, signed=True, per_channel=True, rounding="mse", observer="current"),
        activation=QuantSpec(rounding="ceil", averaging_constant=0.1),
        quantize_input=False, bn_mode="fold", leaf_modules=("Detect",),
        rules=(LayerRule("model.24.*", float=True), LayerRule("layer:3", weight={"bits": 16}),
               LayerRule("model.0.conv", activation={"fixed_exponent": -2, "signed": True})))
    path = tmp_path / "q.yaml"
    cfg.to_yaml(path)
    back = QuantConfig.from_yaml(path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    # as train.py/val.py read --qat-config: layered on default.yaml
    cfg = QuantConfig.from_yaml(path, QuantConfig.from_yaml(REPO / "data" / "quant" / "default.yaml").to_dict())
    assert "Detect" in cfg.leaf_modules
    cfg.to_yaml(tmp_path / "out.yaml")
    assert QuantConfig.from_yaml(tmp_path / "out.yaml") == cfg


def test_trained_thresholds_overlay_keeps_the_default_recipe():
    base = QuantConfig.from_yaml(REPO / "data" / "quant" / "default.yaml")
    cfg = QuantConfig.from_yaml(REPO / "data" / "quant" / "trained_thresholds.yaml", base.to_dict())
    assert cfg.activation.trained_threshold and not cfg.weight.trained_threshold
    assert cfg.rules == base.rules and cfg.activation.observer == base.activation.observer


def test_shipped_head_variants():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "head_float.yaml", "head_fixed.yaml", "earlier_attempt.yaml"} <= names
    base = REPO / "data" / "quant"
    quantize, weight, act = QuantConfig.from_yaml(base / "default.yaml").resolve("model.24.m.0", 24)
    assert quantize and act.rounding == "mse" and act.observer == "histogram" and weight.rounding == "ceil"
    assert QuantConfig.from_yaml(base / "head_float.yaml").resolve("model.24.m.2", 24)[0] is False
    assert QuantConfig.from_yaml(base / "head_float.yaml").resolve("model.23.cv1.conv", 23)[0] is True
    _, _, act = QuantConfig.from_yaml(base / "head_fixed.yaml").resolve("model.24.m.1", 24)
    assert act.signed is True and act.fixed_exponent == 4  # int8: 2**4 / 2**7 = 1/8
    early = QuantConfig.from_yaml(base / "earlier_attempt.yaml")
    assert {early.weight.rounding, *(s.rounding for s in early.resolve("model.24.m.0", 24)[1:])} == {"ceil"}


def test_partial_spec_keeps_config_defaults():
    cfg = QuantConfig.from_dict({"weight": {"bits": 4}})
    assert cfg.weight.bits == 4 and cfg.weight.per_channel and cfg.weight.signed is True


@pytest.mark.parametrize("text,key", [
    ("weights: {bits: 8}\n", "weights"),
    ("weight: {bitz: 8}\n", "bitz"),
    ("rules:\n  - pattern: 'model.1'\n    flaot: true\n", "flaot"),
    ("rules:\n  - pattern: 'model.1'\n    activation: {rnd: ceil}\n", "rnd"),
])
def test_unknown_key_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        QuantConfig.from_yaml(path)
    assert str(path) in str(info.value) and repr(key) in str(info.value)


@pytest.mark.parametrize("data", [
    {"weight": {"bits": 1}}, {"activation": {"rounding": "floor"}}, {"bn_mode": "merge"},
    {"activation": {"averaging_constant": 0.0}}, {"rules": [{"float": True}]},
    {"rules": [{"pattern": "layer:x"}]}, {"input": {"fixed_exponent": 1.5}},
])
def test_bad_values_raise_with_source(data):
    with pytest.raises(ValueError, match="cfg.yaml"):
        QuantConfig.from_dict(data, source="cfg.yaml")


def test_rule_resolution_order():
    # Listed in the reverse of the precedence order: the order of the list must not matter.
    rules = (LayerRule("layer:5", weight={"bits": 5}),
             LayerRule("model.5.*", weight={"bits": 6}),
             LayerRule("model.5.cv1.conv", weight={"bits": 7}))
    cfg = QuantConfig(rules=rules)
    assert cfg.resolve("model.5.cv1.conv", 5)[1].bits == 7      # exact
    assert cfg.resolve("model.5.cv2.conv", 5)[1].bits == 6      # glob
    assert cfg.resolve("model.5", 5)[1].bits == 5               # layer index only
    assert cfg.resolve("model.6.conv", 6)[1].bits == 8          # default
    assert cfg.resolve("model.5", None)[1].bits == 8            # no index given: no layer match
    assert cfg.find_rule("model.6.conv", 6) is None


def test_first_rule_of_a_kind_wins_and_glob_is_case_sensitive():
    cfg = QuantConfig(rules=(LayerRule("model.2*", weight={"bits": 4}), LayerRule("model.*", weight={"bits": 6})))
    assert cfg.resolve("model.24.m.0")[1].bits == 4
    assert cfg.resolve("model.3")[1].bits == 6
    assert cfg.resolve("Model.3")[1].bits == 8


def test_float_rule_and_overrides():
    cfg = QuantConfig(rules=(LayerRule("layer:24", float=True),
                             LayerRule("model.3.conv", activation={"signed": True, "fixed_exponent": 3})))
    quantize, weight, act = cfg.resolve("model.24.m.0", 24)
    assert quantize is False and weight == cfg.weight
    quantize, weight, act = cfg.resolve("model.3.conv", 3)
    assert quantize and act.fixed_exponent == 3 and act.signed is True and weight == cfg.weight


def test_rules_are_immutable_hashable_and_copyable():
    rule = LayerRule("model.1", weight={"bits": 4})
    with pytest.raises(TypeError):
        rule.weight["bits"] = 8
    cfg = QuantConfig(rules=[rule])  # a list becomes a tuple
    assert isinstance(cfg.rules, tuple)
    assert hash(cfg) == hash(copy.deepcopy(cfg)) and copy.deepcopy(cfg) == cfg
    with pytest.raises(ValueError, match="bitz"):
        LayerRule("model.1", weight={"bitz": 4})
