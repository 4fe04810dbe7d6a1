"""Tests for quant/calibrate.py (PTQ calibration) and quant/report.py (the quantizer table)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from quant.calibrate import calibrate
from quant.config import QuantConfig
from quant.fake_quant import Pow2FakeQuantize
from quant.prepare import prepare
from quant.report import HEADER, clipping_ratios, quantizer_table
from quant.schedule import iter_quantizers


class _Net(nn.Module):
    """A conv-BN-ReLU stem, then blocks joined by an add, a max-pool and a concat, then a signed conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        t = self.a(self.stem(x))
        u = self.b(t)
        return self.head(torch.cat([t + u, self.pool(u)], 1))


def _prepared(config: QuantConfig = QuantConfig()) -> nn.Module:
    torch.manual_seed(0)
    return prepare(_Net(), torch.zeros(1, 3, 16, 16), config).train()


def _batches(n_batches: int, size: int = 2, seed: int = 0) -> list:
    """Batches shaped like the dataloader's: (uint8 images, targets, paths, shapes)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=gen), None, None, None)
            for _ in range(n_batches)]


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- calibrate
def test_calibrate_observes_n_images_then_freezes():
    model = _prepared()
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    seen_shapes = []
    # (on the input quantizer: calibration runs the model's frozen view, which shares its modules)
    model.act_quant.input.register_forward_pre_hook(lambda _m, args: seen_shapes.append(args[0].shape[0]))
    assert calibrate(model, _batches(4), n_images=5) == 5
    assert seen_shapes == [2, 2, 1]  # stops after 5 images, trimming the last batch
    assert not model.training
    for name, q in iter_quantizers(model):
        assert int(q.calibrated) == 1 and int(q.observer_enabled) == 0 and not q.calibrating, name
        assert torch.equal(q.exponent, q.exponent.round()), name
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in bn.items())  # BN in eval mode: statistics untouched
    frozen = _state(model)
    model.train()(torch.rand(2, 3, 16, 16) * 50)  # even a training forward no longer observes
    quant_keys = [k for k in frozen if k.endswith(("exponent", "min_val", "max_val", "num_observed"))]
    assert quant_keys and all(torch.equal(frozen[k], model.state_dict()[k]) for k in quant_keys)


def test_calibrate_scales_uint8_to_unit_range():
    model = _prepared(QuantConfig(quantize_input=False))  # the stem reads the float images directly
    (batch,) = _batches(1)
    calibrate(model, [batch[0]], n_images=2)  # a bare tensor batch works too
    # The stem's output quantizer saw the [0,1] images: its range is that of an eval forward of im / 255.
    q = model.get_submodule("act_quant.stem")
    with torch.no_grad():
        expected = float(model.stem(batch[0].float() / 255).max())
    assert float(q.max_val) == pytest.approx(expected, rel=1e-6)


def test_calibrate_refuses_no_images():
    with pytest.raises(ValueError, match="n_images=0"):
        calibrate(_prepared(), _batches(1), n_images=0)


def test_calibrate_freezes_observers_even_when_the_model_fails():
    model = _prepared()
    with pytest.raises(RuntimeError):
        calibrate(model, [torch.zeros(1, 5, 16, 16, dtype=torch.uint8)], n_images=1)  # wrong channel count
    assert all(int(q.observer_enabled) == 0 and not q.calibrating for _, q in iter_quantizers(model))


# ------------------------------------------------------------------------------------- report
def test_quantizer_table_lists_every_quantizer_once_with_pow2_scales():
    model = _prepared()
    calibrate(model, _batches(2), n_images=4)
    table = quantizer_table(model)
    lines = table.splitlines()
    assert lines[0] == HEADER
    names = [line.split()[0] for line in lines[1:]]
    distinct = {id(m) for m in model.modules() if isinstance(m, Pow2FakeQuantize)}
    assert len(names) == len(set(names)) == len(distinct)
    assert "act_quant.stem" in names and "act_quant.input" in names
    for line, (name, q) in zip(lines[1:], iter_quantizers(model)):
        k = torch.log2(q.scale()).round().to(torch.int64)
        scale = f"2^{int(k.min())}" if int(k.min()) == int(k.max()) else f"2^{int(k.min())}..2^{int(k.max())}"
        assert line.startswith(name) and f" {scale} " in line, line
        assert re.search(r"\bu?int8\b", line) and line.rstrip().endswith("-")  # no images: no clipping
    assert re.search(r"^act_quant\.input\s+uint8\s+8\s+2\^-8 ", table, re.M)  # [0,1] input: 2^0 / 2^8


def test_quantizer_table_clipping_column_and_untouched_state():
    model = _prepared()
    calibrate(model, _batches(2), n_images=4)
    model.train()
    before = _state(model)
    images = torch.rand(2, 3, 16, 16) * 4  # 4x the calibrated range: activations clip
    ratios = clipping_ratios(model, images)
    assert model.training  # mode restored
    assert set(ratios) == {n for n, _ in iter_quantizers(model)}
    assert ratios["act_quant.input"] > 0.5 and all(0.0 <= r <= 1.0 for r in ratios.values())
    table = quantizer_table(model, images)
    assert re.search(r"^act_quant\.input .* \d+\.\d\d%$", table, re.M)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_quantizer_table_before_calibration_shows_no_range():
    table = quantizer_table(_prepared())
    row = next(line for line in table.splitlines() if line.startswith("act_quant.stem "))
    assert " - " in row


# ------------------------------------------------------------------------------------- layer errors
def test_layer_errors_rows_and_files(tmp_path):
    from quant.layer_error import (format_layer_errors, layer_errors, plot_layer_errors,
                                   write_layer_errors_csv)

    model = _prepared()
    calibrate(model, _batches(2), n_images=4)
    images = torch.rand(2, 3, 16, 16)
    flags_before = {n: int(q.fake_quant_enabled) for n, q in iter_quantizers(model)}
    state_before = _state(model)
    rows = layer_errors(model, images)
    names = [n for n, _ in iter_quantizers(model)]
    assert [r.name for r in rows] == names  # every distinct quantizer once, in order
    kinds = {r.name: r.kind for r in rows}
    assert kinds["stem.weight_fake_quant"] == "weight" and kinds["act_quant.stem"] == "activation"
    for r in rows:
        assert r.sqnr_alone > 10 and r.sqnr_accumulated > 0, r  # 8 bits: well above the noise
        assert 0.0 <= r.clipped <= 1.0
    acts = [r for r in rows if r.kind == "activation" and r.name != "act_quant.input"]
    # downstream tensors carry the upstream error too: accumulated is never better than alone
    assert all(r.sqnr_accumulated <= r.sqnr_alone + 1e-6 for r in acts)
    assert {n: int(q.fake_quant_enabled) for n, q in iter_quantizers(model)} == flags_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state_before.items())
    table = format_layer_errors(rows)
    assert len(table.splitlines()) == len(rows) + 2 and "SQNR alone" in table
    csv_text = write_layer_errors_csv(rows, tmp_path / "l.csv").read_text().splitlines()
    assert csv_text[0].startswith("name,kind,dtype,exponent,clipped,sqnr_alone") and len(csv_text) == len(rows) + 1
    png = plot_layer_errors(rows, tmp_path / "l.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_errors_see_a_coarse_quantizer():
    """A 3-bit activation stands out: lower SQNR alone than every 8-bit one."""
    from quant.config import LayerRule
    from quant.layer_error import layer_errors

    model = _prepared(QuantConfig(rules=(LayerRule("stem", activation={"bits": 3}),)))
    calibrate(model, _batches(2), n_images=4)
    rows = {r.name: r for r in layer_errors(model, torch.rand(2, 3, 16, 16))}
    coarse = rows["act_quant.stem"].sqnr_alone
    assert all(coarse < r.sqnr_alone for n, r in rows.items() if r.kind == "activation" and n != "act_quant.stem")
