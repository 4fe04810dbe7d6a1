"""Integer-only reference runner vs the fake-quant PyTorch model."""
from __future__ import annotations

import pytest
import torch

from models.yolo import DetectionModel
from quant.integer_ref import IntegerModel, QTensor, compare_with_fake_quant, shift_round
from utils.qat import prepare_qat_model


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    model = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64)
    model.train()
    for _ in range(2):
        model(torch.rand(2, 3, 64, 64))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_shift_round_half_even_and_half_up():
    v = torch.tensor([5, 6, 7, -5, -6, -7, 12, 2, 3])  # /4: 1.25 1.5 1.75 -1.25 -1.5 -1.75 3 .5 .75
    assert shift_round(v, torch.tensor(2)).tolist() == [1, 2, 2, -1, -2, -2, 3, 0, 1]
    assert shift_round(v, torch.tensor(2), "half_up").tolist() == [1, 2, 2, -1, -1, -2, 3, 1, 1]
    assert shift_round(v, torch.tensor(-3)).tolist() == (v * 8).tolist()
    assert shift_round(v, torch.tensor(0)).tolist() == v.tolist()
    with pytest.raises(ValueError, match="rounding"):
        shift_round(v, torch.tensor(1), "ceil")


def test_shift_round_matches_torch_round_on_ties():
    v = torch.arange(-64, 65)
    for s in (1, 3):
        assert torch.equal(shift_round(v, torch.tensor(s)), torch.round(v.double() / 2 ** s).to(torch.int64))


def test_run_gives_int8_head_maps(prepared, images):
    outs = IntegerModel.from_prepared(prepared).run(images)
    assert len(outs) == 3 and all(isinstance(o, QTensor) for o in outs)
    for i, o in enumerate(outs):
        assert o.data.dtype == torch.int64 and o.data.min() >= -128 and o.data.max() <= 127
        head_q = prepared.model[24].m[i].out_quant
        assert torch.equal(torch.pow(2.0, o.exp.double()).float().reshape(1), head_q.scale())
        assert o.data.shape == (2, 3 * 7, 64 // (8 * 2 ** i), 64 // (8 * 2 ** i))


def test_matches_fake_quant_model(prepared, images):
    report = compare_with_fake_quant(prepared, images)
    assert report["float_ops"] == []  # a ReLU model runs entirely in integers
    assert report["values"] == 2 * 21 * (64 + 16 + 4)
    # Only float32 rounding in the fake-quant conv/BN (and the int32 bias rounding) separate them:
    # a value landing within that error of a rounding boundary flips by one step.
    assert report["exact_fraction"] == 1.0  # bit-exact: the QAT model puts its bias on the int32 grid too
    assert report["max_steps"] == 0.0
    assert len(report["layers"]) > 40 and all(d["max_steps"] <= 1.0 for d in list(report["layers"].values())[:3])


def test_half_up_rounding_costs_ties(prepared, images):
    even = compare_with_fake_quant(prepared, images)
    up = compare_with_fake_quant(prepared, images, rounding="half_up")
    tie_layer = "act_quant_model_2_concat"  # add output (two uint8 codes summed) shifted right by one
    assert up["layers"][tie_layer]["exact"] < even["layers"][tie_layer]["exact"]


def test_float_layers_are_reported(prepared, images):
    model = IntegerModel.from_prepared(prepared)
    with pytest.raises(ValueError, match="rounding"):
        IntegerModel.from_prepared(prepared, rounding="stochastic")
    model.run(images.float() / 255)
    assert model.float_ops == []


def test_trained_thresholds_stay_bit_exact(images, tmp_path):
    """A model whose activation thresholds were trained (and moved across rounding boundaries) still runs
    bit-exactly in integers: the exponent the integer model reads is the rounded threshold."""
    from quant.schedule import iter_quantizers, set_observers
    from quant.threshold import sync_exponents, threshold_parameters

    overlay = tmp_path / "tqt.yaml"
    overlay.write_text("activation:\n  trained_threshold: true\n")
    torch.manual_seed(0)
    model = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64, str(overlay)).train()
    model(torch.rand(2, 3, 64, 64))
    set_observers(model, False)
    with torch.no_grad():  # as if training had moved them: up to a step and a half either way
        for i, t in enumerate(threshold_parameters(model)):
            t.add_((-1.4, -0.6, 0.0, 0.7)[i % 4])
    sync_exponents(model)
    moved = [q for _, q in iter_quantizers(model) if q.log2_threshold is not None]
    assert len(moved) > 30
    report = compare_with_fake_quant(model.eval(), images)
    assert report["float_ops"] == [] and report["exact_fraction"] == 1.0 and report["max_steps"] == 0.0
