"""Learned weight rounding (quant/adaround.py)."""
from __future__ import annotations

import torch
from torch import nn

from quant.adaround import AdaRoundOptions, learn_rounding
from quant.calibrate import calibrate
from quant.config import QuantConfig, QuantSpec
from quant.prepare import prepare
from quant.ptq import post_training_quantize


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.b(self.a(x))


def _config(**kwargs) -> QuantConfig:
    # 4-bit weights make rounding matter; fine activations keep the test about the weights
    weight = QuantSpec(bits=4, per_channel=True, signed=True, observer="current", rounding="ceil")
    activation = QuantSpec(bits=16, observer="minmax", rounding="ceil")
    return QuantConfig(weight=weight, activation=activation, quantize_input=False, **kwargs)


def _setup():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for bn in (net.a[1], net.b[1]):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    prepared = prepare(net, torch.zeros(1, 3, 16, 16), _config())
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    calibrate(prepared, [images], n_images=16)
    return net, prepared, images


def _output_error(prepared, net, images) -> float:
    with torch.no_grad():
        return float((prepared(images) - net(images)).pow(2).mean())


def test_learned_rounding_lowers_the_reconstruction_error():
    net, prepared, images = _setup()
    nearest = _output_error(prepared, net, images)
    ratios = learn_rounding(prepared, [images], n_images=16, options=AdaRoundOptions(iterations=150))
    assert set(ratios) == {"a", "b"} and all(r < 1.0 for r in ratios.values()), ratios
    assert _output_error(prepared, net, images) < 0.8 * nearest


def test_learned_weights_sit_exactly_on_the_grid_and_stay_within_one_step():
    net, prepared, images = _setup()
    before = prepared.a.folded_weight_and_bias()[0]
    step = prepared.a.weight_fake_quant.scale().reshape(-1, 1, 1, 1)
    learn_rounding(prepared, [images], n_images=16, options=AdaRoundOptions(iterations=50))
    after = prepared.a.folded_weight_and_bias()[0]
    levels = after / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # grid values (up to the BN fold's rounding)
    assert float(((after - before) / step).abs().max()) < 1.0 + 1e-4  # floor or ceil of the float weight
    with torch.no_grad():  # and the quantizer maps them to themselves: the model runs the learned rounding
        assert torch.allclose(prepared.a.weight_fake_quant(after), after, atol=1e-6)


def test_ptq_runs_learned_rounding_when_the_config_says_so():
    net, _, images = _setup()
    for learned in (False, True):
        config = _config(learned_rounding=learned)
        prepared = prepare(net, torch.zeros(1, 3, 16, 16), config)
        summary = post_training_quantize(prepared, [images], 16, config)
        assert (summary["learned_rounding_s"] > 0) == learned and not prepared.training


def test_learned_rounding_works_under_no_grad():
    """val.py runs PTQ inside torch.no_grad(): learning must still get gradients."""
    net, prepared, images = _setup()
    with torch.no_grad():
        ratios = learn_rounding(prepared, [images], n_images=16, options=AdaRoundOptions(iterations=20))
    assert set(ratios) == {"a", "b"}
