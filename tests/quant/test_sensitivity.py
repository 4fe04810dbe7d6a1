"""Sensitivity ranking and mixed precision (quant/sensitivity.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quant.calibrate import calibrate
from quant.config import LayerRule, QuantConfig, QuantSpec
from quant.prepare import prepare
from quant.schedule import iter_quantizers
from quant.sensitivity import fewest_wide_layers, mixed_precision_config, output_sqnr, rank_layers, weighted_layers


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _prepared(config: QuantConfig) -> nn.Module:
    torch.manual_seed(0)
    model = prepare(_Net(), torch.zeros(1, 3, 16, 16), config)
    calibrate(model, [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))], n_images=4)
    return model


def test_rank_finds_the_coarse_layer_and_leaves_the_model_as_it_was():
    config = QuantConfig(activation=QuantSpec(observer="minmax", rounding="ceil"),
                         rules=(LayerRule("b", weight={"bits": 3}, activation={"bits": 3}),))
    model = _prepared(config)
    assert [name for name, _ in weighted_layers(model)] == ["a", "b", "c"]
    flags = {n: int(q.fake_quant_enabled) for n, q in iter_quantizers(model)}
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images)
    ranking = rank_layers(model, images)
    assert ranking[0][0] == "b"  # the 3-bit layer hurts the output most
    assert [db for _, db in ranking] == sorted(db for _, db in ranking)
    assert {n: int(q.fake_quant_enabled) for n, q in iter_quantizers(model)} == flags
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_output_sqnr():
    ref = torch.ones(10)
    assert math.isinf(output_sqnr(ref, ref.clone()))
    assert output_sqnr((ref, [ref]), (ref + 0.1, [ref])) == pytest.approx(10 * math.log10(20 / 0.1), rel=1e-6)


def test_fewest_wide_layers_bisects_to_the_smallest_n():
    calls = []

    def score(wide):
        calls.append(len(wide))
        return min(len(wide), 6) / 10  # meets 0.45 from 5 layers on

    names = [f"l{i}" for i in range(20)]
    assert fewest_wide_layers(names, score, 0.45) == (5, 0.5)
    assert len(calls) == len(set(calls)) and len(calls) <= 7  # each N once, log2-many
    assert fewest_wide_layers(names, lambda wide: 1.0, 0.45)[0] == 0
    assert fewest_wide_layers(names, lambda wide: 0.0, 0.45) == (20, 0.0)  # unreachable: all of them


def test_mixed_precision_yaml_loads_and_widens_the_named_layers(tmp_path):
    base = QuantConfig(rules=(LayerRule("c", activation={"rounding": "ceil"}),))
    path = tmp_path / "mixed.yaml"
    mixed_precision_config(base, ["b"]).to_yaml(path)
    cfg = QuantConfig.from_yaml(path)
    model = _prepared(cfg)
    assert model.get_submodule("b.weight_fake_quant").bits == 16
    assert model.get_submodule("act_quant.b").bits == 16
    assert model.get_submodule("a.weight_fake_quant").bits == 8
    assert cfg.resolve("c")[2].rounding == "ceil"  # the config's own rules are kept
