"""Tests for quant/fused.py: simulated BN folding, fold mode, BN freeze, head convs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.config import QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv, QATConvBnAct


class _Grid(nn.Module):
    """A stand-in weight quantizer: rounds to a 1/32 grid (stateless, so results are comparable)."""

    def forward(self, w):
        return torch.round(w * 32) / 32


def _conv_bn(seed: int = 0, bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.03)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return conv, bn


def _ref_act(kind):
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), None: nn.Identity()}[kind]


@pytest.mark.parametrize("act", ["relu", "relu6", None])
def test_eval_matches_unfused_with_identity_quantizer(act):
    conv, bn = _conv_bn()
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), _ref_act(act)).eval()
    fused = QATConvBnAct(conv, bn, act, nn.Identity()).eval()
    x = torch.randn(2, 3, 8, 8) * 3
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)


def test_train_mode_matches_unfused_and_updates_running_stats():
    conv, bn = _conv_bn(1, bias=True)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU()).train()
    fused = QATConvBnAct(conv, bn, "relu", nn.Identity()).train()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, ref[1].running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref[1].running_var)


def test_simulated_folding_in_eval_equals_folded_conv():
    conv, bn = _conv_bn(2)
    fused = QATConvBnAct(conv, bn, "relu", _Grid()).eval()
    x = torch.randn(2, 3, 8, 8)
    w_fold, b_fold = fused.folded_weight_and_bias()
    expected = F.relu(F.conv2d(x, _Grid()(w_fold), b_fold, padding=1))
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
    # the weight really was quantized: a float conv differs
    assert not torch.allclose(fused(x), F.relu(F.conv2d(x, w_fold, b_fold, padding=1)), atol=1e-4)


def test_fold_mode_equals_simulated_eval():
    conv, bn = _conv_bn(3, bias=True)
    sim = QATConvBnAct(copy.deepcopy(conv), copy.deepcopy(bn), "relu6", _Grid(), "simulate").eval()
    fold = QATConvBnAct(conv, bn, "relu6", _Grid(), "fold")
    assert fold.bn is None and fold.conv.bias is not None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fold(x), sim(x), rtol=1e-5, atol=1e-5)
    fold.train()
    torch.testing.assert_close(fold(x), sim(x), rtol=1e-5, atol=1e-5)  # no BN left: no batch statistics


def test_freeze_bn_uses_running_stats_in_train_mode():
    conv, bn = _conv_bn(4)
    fused = QATConvBnAct(conv, bn, None, _Grid())
    x = torch.randn(4, 3, 8, 8)
    batch_stats = fused.train()(x)
    expected = fused.eval()(x)
    assert not torch.allclose(batch_stats, expected, atol=1e-4)
    fused.train().freeze_bn()
    before = fused.bn.running_mean.clone()
    torch.testing.assert_close(fused(x), expected)
    torch.testing.assert_close(fused.bn.running_mean, before)
    fused.unfreeze_bn()
    assert not torch.allclose(fused(x), expected, atol=1e-4)


def test_batch_statistics_path_equals_dividing_the_output():
    """BN live: the scale is undone on the weight, conv(x, wq(W * sf) / sf); values, gradients and running
    statistics equal the textbook conv(x, wq(W * sf)) / sf (+ bias) then BN, to float rounding."""
    conv, bn = _conv_bn(9, bias=True)
    fq = Pow2FakeQuantize(QuantSpec(per_channel=True, signed=True, observer="minmax"), True, num_channels=8)
    fused = QATConvBnAct(conv, bn, "relu", fq).train()
    ref_conv, ref_bn = copy.deepcopy(fused.conv), copy.deepcopy(fused.bn)
    x = torch.randn(4, 3, 8, 8)
    got = fused(x)
    sf = ref_bn.weight / torch.sqrt(ref_bn.running_var + ref_bn.eps)
    w_q = fq(ref_conv.weight * sf.reshape(-1, 1, 1, 1))
    y = F.conv2d(x, w_q, None, padding=1) / sf.reshape(1, -1, 1, 1) + ref_conv.bias.reshape(1, -1, 1, 1)
    expected = F.relu(ref_bn(y))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, ref_bn.running_var)
    upstream = torch.randn_like(got)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for mine, ref in ((fused.conv.weight, ref_conv.weight), (fused.bn.weight, ref_bn.weight),
                      (fused.bn.bias, ref_bn.bias), (fused.conv.bias, ref_conv.bias)):  # the last: ~0 (batch mean)
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-5)
    assert fused.conv.weight.grad.abs().sum() > 0 and fused.bn.weight.grad.abs().sum() > 0


def test_frozen_bn_is_the_simulated_folding_with_running_stats_forward_and_backward():
    """Frozen BN runs one conv with the folded quantized weight and the folded bias; values and
    gradients (conv weight and bias, gamma, beta) equal the simulated form conv(x, wq(W * sf)) / sf,
    then BN with its running statistics, to float rounding."""
    conv, bn = _conv_bn(8, bias=True)
    fq = Pow2FakeQuantize(QuantSpec(per_channel=True, signed=True, observer="minmax"), True, num_channels=8)
    fused = QATConvBnAct(conv, bn, "relu", fq).train()
    x = torch.randn(4, 3, 8, 8)
    fused(x)  # observe the weight range once, then keep it
    fq.enable_observer(False)
    fused.freeze_bn()
    stats = fused.bn.running_mean.clone(), fused.bn.running_var.clone()
    ref_conv, ref_bn = copy.deepcopy(fused.conv), copy.deepcopy(fused.bn)
    sf = ref_bn.weight / torch.sqrt(ref_bn.running_var + ref_bn.eps)
    y = F.conv2d(x, fq(ref_conv.weight * sf.reshape(-1, 1, 1, 1)), None, padding=1) / sf.reshape(1, -1, 1, 1)
    y = y + ref_conv.bias.reshape(1, -1, 1, 1)
    expected = F.relu(F.batch_norm(y, ref_bn.running_mean, ref_bn.running_var, ref_bn.weight, ref_bn.bias,
                                   training=False, eps=ref_bn.eps))
    got = fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(got)
    (got * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for mine, ref in ((fused.conv.weight, ref_conv.weight), (fused.conv.bias, ref_conv.bias),
                      (fused.bn.weight, ref_bn.weight), (fused.bn.bias, ref_bn.bias)):
        assert mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.bn.running_mean, stats[0]) and torch.equal(fused.bn.running_var, stats[1])


def test_backward_reaches_conv_and_bn_through_pow2_quantizer():
    conv, bn = _conv_bn(5)
    fq = Pow2FakeQuantize(QuantSpec(per_channel=True, signed=True, observer="minmax"), True, num_channels=8)
    fused = QATConvBnAct(conv, bn, "relu", fq).train()
    x = torch.randn(2, 3, 8, 8)
    fused(x).square().mean().backward()
    for p in (fused.conv.weight, fused.bn.weight, fused.bn.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert bool(fq.calibrated)
    # eval: exactly conv with the quantized folded weight plus the folded bias
    fused.eval()
    w_fold, b_fold = fused.folded_weight_and_bias()
    with torch.no_grad():
        expected = F.relu(F.conv2d(x, fq(w_fold), b_fold, padding=1))
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_gamma_stays_finite():
    conv, bn = _conv_bn(6)
    with torch.no_grad():
        bn.weight[0] = 0.0
    fused = QATConvBnAct(conv, bn, None, _Grid())
    assert torch.isfinite(fused.train()(torch.randn(2, 3, 8, 8))).all()
    assert torch.isfinite(fused.eval()(torch.randn(2, 3, 8, 8))).all()


def test_no_bn_chain_and_bad_arguments():
    conv, bn = _conv_bn(7, bias=True)
    plain = QATConvBnAct(conv, None, "relu", nn.Identity())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(plain(x), F.relu(conv(x)))
    w, b = plain.folded_weight_and_bias()
    torch.testing.assert_close(w, conv.weight.detach())
    torch.testing.assert_close(b, conv.bias.detach())
    with pytest.raises(ValueError, match="silu"):
        QATConvBnAct(conv, bn, "silu", nn.Identity())
    with pytest.raises(ValueError, match="channels"):
        QATConvBnAct(conv, nn.BatchNorm2d(4), None, nn.Identity())
    with pytest.raises(ValueError, match="bn_mode"):
        QATConvBnAct(conv, bn, None, nn.Identity(), bn_mode="merge")


def test_state_dict_keys_are_readable():
    conv, bn = _conv_bn(8)
    keys = set(QATConvBnAct(conv, bn, "relu", _Grid()).state_dict())
    assert {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= keys


def test_qat_conv_for_head():
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 6, 1)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(QATConv(conv, nn.Identity())(x), conv(x))
    head = QATConv(conv, _Grid(), _Grid())
    expected = _Grid()(F.conv2d(x, _Grid()(conv.weight), conv.bias))
    torch.testing.assert_close(head(x), expected)
    assert set(head.state_dict()) == {"weight", "bias"} and head.weight is conv.weight
    assert isinstance(head, nn.Conv2d) and isinstance(head.out_quant, _Grid)
