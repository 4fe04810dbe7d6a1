"""Trained power-of-2 thresholds (TQT): values, gradients, training toward the least-error exponent,
and the exponent kept equal to the rounded threshold."""
from __future__ import annotations

import math

import pytest
import torch

from quant.config import QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fq_ops import threshold_fake_quant
from quant.threshold import is_threshold_parameter, sync_exponents, threshold_optimizer, threshold_parameters

SPEC = QuantSpec(bits=8, rounding="ceil", observer="minmax", trained_threshold=True)


def _quantizer(spec: QuantSpec = SPEC, signed: bool = True, channels: int = 1) -> Pow2FakeQuantize:
    return Pow2FakeQuantize(spec, signed=signed, num_channels=channels)


def _errors_by_exponent(x: torch.Tensor, ks: range) -> dict[int, float]:
    out = {}
    for k in ks:
        s = 2.0 ** (k - 7)
        out[k] = float(((torch.clamp(torch.round(x / s), -128, 127) * s - x) ** 2).mean())
    return out


def test_forward_equals_the_fixed_exponent_quantizer():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8) * 3
    fq = _quantizer().train()
    fq(x)  # observe: the threshold starts at the observed exponent
    assert float(fq.log2_threshold.detach()) == float(fq.exponent) == 4.0  # ceil(log2 max|x|) for this seed
    trained = fq(x)  # training + grad: the threshold path
    fq.eval()
    assert torch.equal(trained, fq(x))  # eval: the exponent path, the same values


def test_gradient_is_the_tqt_formula():
    x = torch.tensor([0.30, -0.70, 1.26, 5.0, -9.0])  # two clipped above/below at k = 0 (range ~[-1, 0.99])
    t = torch.zeros(1, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    out = threshold_fake_quant(xg, t, (), 8, True, -128, 127)
    out.sum().backward()
    s = 2.0 ** -7
    inside = (x / s).round().clamp(-128, 127) == (x / s).round()
    expected_t = torch.where(inside, (x / s).round() - x / s,
                             torch.where(x > 0, torch.tensor(127.0), torch.tensor(-128.0))) * s * math.log(2)
    assert float(t.grad) == pytest.approx(float(expected_t.sum()), rel=1e-5)
    assert torch.equal(xg.grad, inside.float())  # straight through inside, zero where clipped


def test_trained_threshold_reaches_the_least_error_exponent():
    """Gaussian data with one outlier: the observed range (k = ceil(log2 max)) is far too wide; gradient
    steps on the quantization error move the threshold to the exponent with the least squared error,
    and the scale is an exact power of two at every step."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200000), torch.tensor([40.0])])
    errors = _errors_by_exponent(x, range(-2, 8))
    best = min(errors, key=errors.get)
    fq = _quantizer().train()
    fq(x)
    fq.enable_observer(False)  # thresholds train once the observer is frozen
    assert float(fq.exponent) == 6.0 and best <= 4  # starts wide
    opt = threshold_optimizer(fq, lr=0.05)
    for _ in range(150):
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync_exponents(fq)
        k = float(fq.exponent)
        assert k == round(float(fq.log2_threshold.detach())) and k.is_integer()
        assert math.log2(float(fq.scale())) == k - 7  # exact power of two
    assert float(fq.exponent) == best


def test_per_channel_weight_thresholds_train_per_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 4.0, 0.02]).view(4, 1, 1, 1)
    spec = QuantSpec(bits=8, per_channel=True, signed=True, rounding="ceil", observer="current",
                     trained_threshold=True)
    fq = _quantizer(spec, channels=4).train()
    fq(w)
    assert fq.log2_threshold.shape == (4,)
    assert torch.equal(fq.log2_threshold.detach(), fq.exponent)
    fq(w).pow(2).sum().backward()
    assert fq.log2_threshold.grad.shape == (4,) and bool((fq.log2_threshold.grad != 0).all())


def test_observer_overwrites_threshold_and_sync_follows_optimizer():
    fq = _quantizer().train()
    fq(torch.full((10,), 3.0))
    assert float(fq.log2_threshold.detach()) == 2.0
    with torch.no_grad():
        fq.log2_threshold.fill_(0.6)
    sync_exponents(fq)
    assert float(fq.exponent) == 1.0
    fq(torch.full((10,), 30.0))  # observing again: the observer decides
    assert float(fq.log2_threshold.detach()) == float(fq.exponent) == 5.0


def test_fixed_exponent_and_untrained_quantizers_have_no_threshold():
    fixed = Pow2FakeQuantize(QuantSpec(fixed_exponent=3, trained_threshold=True), signed=True)
    plain = Pow2FakeQuantize(QuantSpec(), signed=True)
    assert fixed.log2_threshold is None and plain.log2_threshold is None
    assert threshold_optimizer(torch.nn.Sequential(fixed, plain), lr=0.1) is None
    trained = _quantizer()
    model = torch.nn.Sequential(trained, plain)
    assert threshold_parameters(model) == [trained.log2_threshold]
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.log2_threshold"] and is_threshold_parameter(names[0])
    assert not is_threshold_parameter("model.0.conv.weight")


def test_main_optimizer_leaves_thresholds_to_their_own():
    from utils.torch_utils import smart_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), _quantizer())
    opt = smart_optimizer(model, "SGD", 0.01, 0.9, 1e-4, skip=("log2_threshold",))
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[1].log2_threshold) not in params and id(model[0].weight) in params


def test_state_dict_round_trip_is_exact():
    fq = _quantizer().train()
    fq(torch.randn(100) * 5)
    with torch.no_grad():
        fq.log2_threshold.add_(0.123456789)
    sync_exponents(fq)
    other = _quantizer()
    other.load_state_dict(fq.state_dict())
    assert torch.equal(other.log2_threshold, fq.log2_threshold) and torch.equal(other.exponent, fq.exponent)
