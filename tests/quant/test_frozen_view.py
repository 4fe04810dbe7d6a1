"""Tests for quant/frozen_view.py: which re-quantizations it drops, and that with observers frozen the
view computes bit for bit what the prepared model computes, forward and backward, BN live or frozen;
with observers running, that it counts each value once and the ReLU fold observes relu(x) exactly."""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

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
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "data" / "quant" / "default.yaml"


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



def test_observing_through_the_view_counts_each_value_once():
    """With observers running the view leaves the joined tensors out of the statistics: after one step from
    the same state, each histogram of a concat's set holds exactly the joined tensors' values fewer than on
    the full graph (which counts them a second time), and one observation fewer per dropped call. (Whether
    that moves an exponent is measured on real data: notes/qat_speed.md, tenth round.)"""
    from torch.fx.passes.shape_prop import ShapeProp

    torch.manual_seed(0)
    model = DetectionModel("yolov5p.yaml", nc=3, act="relu")
    prepared = prepare(model.train(), X[:1], QuantConfig.from_yaml(DEFAULT_CONFIG))  # histogram observers
    full, sizes = copy.deepcopy(prepared), copy.deepcopy(prepared)
    ShapeProp(sizes).propagate(X)
    joined_values = Counter()
    for node in redundant_requantizations(sizes):
        joined_values[str(node.target)] += node.args[0].meta["tensor_meta"].shape.numel()
    dropped = Counter(str(n.target) for n in redundant_requantizations(full))
    assert sum(dropped.values()) == 13 and len(dropped) == 11  # two sets hold two concats each
    _step(full, X)
    _step(frozen_view(prepared), X)
    mine, theirs = dict(prepared.named_modules()), dict(full.named_modules())
    for name, count in dropped.items():
        calls = sum(1 for n in full.graph.nodes if n.op == "call_module" and n.target == name)
        assert (int(mine[name].num_observed), int(theirs[name].num_observed)) == (calls - count, calls)
        assert mine[name]._histogram.total == theirs[name]._histogram.total - joined_values[name] > 0, name


@pytest.mark.parametrize("counter", ["histc", "bincount"])
def test_fake_quant_after_relu_observes_what_relu_then_quantizer_observe(counter, monkeypatch):
    """A histogram observer fed through fake_quant_after_relu counts relu(x) from x itself: the same
    histogram, range, exponent, output and gradient as quantizer(relu(x)), first observation and growing
    ranges included, with either counter; a NaN or an infinity takes the plain path."""
    import quant.histogram

    monkeypatch.setattr(quant.histogram, "histc_is_faster", lambda: counter == "histc")
    spec = QuantConfig.from_yaml(DEFAULT_CONFIG).activation
    fused, plain = Pow2FakeQuantize(spec, signed=False).train(), Pow2FakeQuantize(spec, signed=False).train()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 8, 16, 16, generator=g), -torch.rand(2, 8, 4, 4, generator=g),
              torch.randn(4, 8, 16, 16, generator=g) * 40, torch.full((1, 8, 2, 2), 64.0),
              torch.tensor([[-1.0, float("nan"), 3.0]]), torch.tensor([[-float("inf"), 2.0]])]
    for x in inputs:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_fused, out_plain = fused.fake_quant_after_relu(a), plain(torch.relu(b))
        assert torch.equal(out_fused.nan_to_num(7.0), out_plain.nan_to_num(7.0))
        weight = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
        (out_fused.nan_to_num(0.0) * weight).sum().backward()
        (out_plain.nan_to_num(0.0) * weight).sum().backward()
        assert torch.equal(a.grad, b.grad)
        h, k = fused._histogram, plain._histogram
        assert (h.top, h.total, h.negatives) == (k.top, k.total, k.negatives)
        assert torch.equal(h.hist, k.hist)
        for key in ("min_val", "max_val", "exponent", "num_observed"):
            assert torch.equal(getattr(fused, key), getattr(plain, key)), key
    assert int(fused.num_observed) == len(inputs)
