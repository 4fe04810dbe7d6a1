"""Tests for quant/frozen_view.py: which re-quantizations it drops, and that with observers frozen the
view computes bit for bit what the prepared model computes, forward and backward, BN live or frozen."""
from __future__ import annotations

import copy

import pytest
import torch

from models.yolo import DetectionModel
from quant.config import QuantConfig
from quant.fake_quant import Pow2FakeQuantize
from quant.frozen_view import frozen_view, redundant_requantizations, relu_quantizer_pairs
from quant.prepare import prepare
from quant.schedule import set_bn_frozen, set_observers
from tests.tiny_nets import AddConcatNet

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _observed(model: torch.nn.Module, config: QuantConfig = QuantConfig()) -> torch.nn.Module:
    """``model`` prepared, trained two steps with observers on (ranges and BN statistics move), then
    with every observer frozen."""
    prepared = prepare(model.train(), X[:1], config)
    for _ in range(2):
        out = prepared(X)
        sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    prepared.zero_grad()
    set_observers(prepared, False)
    return prepared


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and parameter gradients of one forward/backward (gradients cleared first)."""
    for p in model.parameters():
        p.grad = None
    out = model(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_identical(prepared: torch.nn.Module, view: torch.nn.Module, x: torch.Tensor) -> None:
    reference = copy.deepcopy(prepared)  # BN live: both runs must start from the same running statistics
    want_out, want_grad = _step(reference, x)
    got_out, got_grad = _step(view, x)
    assert all(torch.equal(a, b) for a, b in zip(want_out, got_out))
    assert want_grad.keys() == {n for n, _ in prepared.named_parameters()}
    for name, grad in want_grad.items():
        assert torch.equal(grad, got_grad[name]), name
    for (name, a), b in zip(reference.state_dict().items(), prepared.state_dict().values()):
        assert torch.equal(a, b), name  # the same BN statistic updates


@pytest.mark.parametrize("pool", [False, True])
def test_tiny_net_drops_the_concat_requantization_only(pool):
    prepared = _observed(AddConcatNet(pool=pool))
    dropped = redundant_requantizations(prepared)
    assert len(dropped) == 1 and dropped[0].args[0].target is torch.cat  # inputs through the max-pool too
    pairs = relu_quantizer_pairs(prepared)
    assert len(pairs) == 3  # each ReLU conv feeds its own uint8 quantizer
    view = frozen_view(prepared)
    assert sum(n.op == "call_module" for n in view.graph.nodes) == \
        sum(n.op == "call_module" for n in prepared.graph.nodes) - 1 - 2 * len(pairs)
    assert sum(n.op == "call_function" and n.target.__name__ == "_fake_quant_after_relu" for n in view.graph.nodes) == 3
    assert dict(view.named_parameters()).keys() == dict(prepared.named_parameters()).keys()
    assert all(a is b for a, b in zip(view.parameters(), prepared.parameters()))  # shared, not copied
    x = X * 3 - 1
    _assert_identical(prepared, view, x)
    set_bn_frozen(prepared, True)
    _assert_identical(prepared, view, x)


def test_yolo_view_is_bit_identical_bn_live_and_frozen():
    torch.manual_seed(0)
    prepared = _observed(DetectionModel("yolov5p.yaml", nc=3, act="relu"), QuantConfig(leaf_modules=("Detect",)))
    dropped = redundant_requantizations(prepared)
    concats = sum(1 for n in prepared.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    assert len(dropped) == concats == 13  # every C3, the SPPF and the four head-side concats
    assert len(relu_quantizer_pairs(prepared)) == 57  # every fused conv's ReLU moves into its quantizer
    view = frozen_view(prepared)
    _assert_identical(prepared, view, X)
    set_bn_frozen(prepared, True)
    _assert_identical(prepared, view, X)


def test_not_dropped_when_an_input_has_another_quantizer():
    prepared = _observed(AddConcatNet())
    cat = next(n for n in prepared.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    requant = next(iter(cat.users))
    extra = Pow2FakeQuantize(QuantConfig().activation, signed=False)
    prepared.add_module("other_quant", extra)
    first = cat.args[0][0]
    with prepared.graph.inserting_after(first):
        other = prepared.graph.call_module("other_quant", (first.args[0],))
    cat.replace_input_with(first, other)  # one input now comes from a different quantizer
    prepared.recompile()
    assert requant not in redundant_requantizations(prepared)
