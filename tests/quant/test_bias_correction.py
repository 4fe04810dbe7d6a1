"""Bias correction (quant/bias_correction.py) and the PTQ entry point (quant/ptq.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quant.bias_correction import correct_bias
from quant.calibrate import calibrate
from quant.config import QuantConfig, QuantSpec
from quant.ptq import post_training_quantize
from quant.schedule import iter_quantizers
from quant.prepare import prepare


class _Net(nn.Module):
    """conv-BN (no activation, so the mean shift passes through linearly), then a conv with bias."""

    def __init__(self, head: bool = True):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1) if head else nn.Identity()

    def forward(self, x):
        return self.head(self.a(x))


def _net_with_biased_rounding(head: bool = True) -> nn.Module:
    """Weights that 2-bit quantization rounds the same way (to 0.25 or 0): a mean shift per channel."""
    torch.manual_seed(0)
    net = _Net(head).eval()
    with torch.no_grad():
        net.a[0].weight.uniform_(0.14, 0.2)
        net.a[1].running_var.fill_(1.0)
        if head:
            net.head.weight.uniform_(0.14, 0.2)
    return net


def _config(bias_correction: bool = False) -> QuantConfig:
    # 2-bit weights with range 2^-1: the grid step 0.25 sends every weight in (0, 0.125) to 0.
    weight = QuantSpec(bits=2, per_channel=True, signed=True, observer="current", fixed_exponent=-1)
    return QuantConfig(weight=weight, activation=QuantSpec(bits=16, observer="minmax", rounding="ceil"),
                       quantize_input=False, bias_correction=bias_correction)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _mean_error(prepared: nn.Module, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (prepared(images) - net(images)).mean(dim=(0, 2, 3))


def test_bias_correction_removes_a_constructed_mean_shift():
    net = _net_with_biased_rounding(head=False)
    prepared = prepare(net, torch.zeros(1, 3, 12, 12), _config())
    images = _images()
    calibrate(prepared, [images], n_images=8)
    other = _images(seed=1)
    before, before_other = _mean_error(prepared, net, images), _mean_error(prepared, net, other)
    assert float(before.abs().min()) > 0.3  # the rounding really shifts every channel
    shifts = correct_bias(prepared, [images], n_images=8)
    assert set(shifts) == {"a"}
    assert float(_mean_error(prepared, net, images).abs().max()) < 1e-3 * float(before.abs().max())
    # on other images from the same distribution the shift stays mostly removed
    assert float(_mean_error(prepared, net, other).abs().max()) < 0.1 * float(before_other.abs().max())


def test_bias_correction_helps_a_stack_of_layers():
    net = _net_with_biased_rounding()
    prepared = prepare(net, torch.zeros(1, 3, 12, 12), _config())
    images = _images()
    calibrate(prepared, [images], n_images=8)
    before = float(_mean_error(prepared, net, images).abs().max())
    assert set(correct_bias(prepared, [images], n_images=8)) == {"a", "head"}
    assert float(_mean_error(prepared, net, images).abs().max()) < 0.2 * before


def test_bias_correction_keeps_working_in_qat_mode():
    """With BN the shift lives in the running mean, so a training forward with batch statistics (which
    remove any mean shift themselves) is unchanged, and the eval output stays corrected."""
    net = _net_with_biased_rounding()
    prepared = prepare(net, torch.zeros(1, 3, 12, 12), _config())
    images = _images()
    calibrate(prepared, [images], n_images=8)
    prepared.a.bn.momentum = 0.0  # no statistics update: only the correction differs between the two calls
    prepared.train()
    with torch.no_grad():
        train_before = prepared.a(images)
    correct_bias(prepared, [images], n_images=8)
    prepared.train()
    with torch.no_grad():
        assert torch.allclose(prepared.a(images), train_before, atol=1e-6)


def test_ptq_entry_point_follows_the_config():
    for flag in (False, True):
        net = _net_with_biased_rounding()
        config = _config(bias_correction=flag)
        prepared = prepare(net, torch.zeros(1, 3, 12, 12), config)
        summary = post_training_quantize(prepared, [_images()], 8, config)
        assert summary["images"] == 8 and summary["bias_corrected"] == (2 if flag else 0)
        assert not prepared.training
        assert all(int(q.observer_enabled) == 0 for _, q in iter_quantizers(prepared) if not q.fixed)


def test_bias_correction_refuses_no_images():
    net = _net_with_biased_rounding()
    prepared = prepare(net, torch.zeros(1, 3, 12, 12), _config())
    with pytest.raises(ValueError, match="n_images=0"):
        correct_bias(prepared, [_images()], n_images=0)


def test_config_key_round_trips():
    cfg = QuantConfig.from_dict({"bias_correction": True})
    assert cfg.bias_correction and QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bias_correction"):
        QuantConfig.from_dict({"bias_correction": "yes"})
