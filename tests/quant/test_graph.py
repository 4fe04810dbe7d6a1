"""Tests for quant/graph.py: tracing with leaves, Conv->BN->act chains, alignment groups, Graphviz."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.common import Bottleneck, Conv
from models.yolo import DetectionModel
from quant.config import QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv
from quant.graph import (Group, find_alignment_groups, find_conv_bn_act, is_pass_through, leaf_conv_inputs,
                         merge_groups, resolve_producer, set_submodule, trace)
from quant.graphviz import write_graphviz


def _yolo(act: str) -> tuple[DetectionModel, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", act=act)
    return model, trace(model, ("Detect",), {"augment": False})


@pytest.fixture(scope="module")
def relu_yolo():
    return _yolo("relu")


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_trace_keeps_named_leaf_opaque(relu_yolo):
    _, gm = relu_yolo
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "model.24" in targets
    assert not any(str(t).startswith("model.24.") for t in targets)
    # the Concat modules are traced through into torch.cat calls
    assert sum(n.target is torch.cat for n in gm.graph.nodes) == 13


class _Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on a tensor value


def test_untraceable_model_raises_with_hint():
    with pytest.raises(ValueError, match="_Branchy: .*leaf"):
        trace(_Branchy())
    trace(nn.Sequential(_Branchy()), leaf_classes=("_Branchy",))  # fine as a leaf


def test_chain_for_every_conv_block(relu_yolo):
    model, gm = relu_yolo
    chains = find_conv_bn_act(gm)
    blocks = [name for name, m in model.named_modules() if isinstance(m, Conv)]
    assert len(blocks) == 57
    assert sorted(c.conv for c in chains) == sorted(f"{b}.conv" for b in blocks)
    assert all(c.bn == c.conv[:-4] + "bn" and c.act == c.conv[:-4] + "act" for c in chains)
    assert {c.act_kind for c in chains} == {"relu"}
    assert all(len(c.nodes) == 3 and c.describe() == "conv+bn+relu" for c in chains)


def test_silu_is_reported_not_fused():
    _, gm = _yolo("silu")
    chains = find_conv_bn_act(gm)
    assert len(chains) == 57
    assert {c.act_kind for c in chains} == {"other"}
    assert all(c.fused_act is None and len(c.nodes) == 2 and c.describe() == "conv+bn" for c in chains)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.c3, self.b3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu6(self.b1(self.c1(x)))
        z = torch.relu(self.c2(y))
        w = self.c3(z)
        return self.b3(w) + w  # the conv output has two users: BN cannot fold into it


def test_functional_activations_and_shared_outputs():
    gm = trace(_Functional())
    chains = {c.conv: c for c in find_conv_bn_act(gm)}
    assert chains["c1"].bn == "b1" and chains["c1"].act_kind == "relu6" and len(chains["c1"].nodes) == 3
    assert chains["c2"].bn is None and chains["c2"].act_kind == "relu" and chains["c2"].describe() == "conv+relu"
    assert chains["c3"].bn is None and chains["c3"].act is None and chains["c3"].nodes == ("c3",)


def test_every_concat_and_bottleneck_add_is_a_group(relu_yolo):
    model, gm = relu_yolo
    groups = find_alignment_groups(gm)
    cats = [n.name for n in gm.graph.nodes if n.target is torch.cat]
    adds = [n.name for n in gm.graph.nodes if n.target is operator.add]
    n_shortcuts = sum(isinstance(m, Bottleneck) and m.add for m in model.modules())
    assert len(adds) == n_shortcuts == 7
    assert [g.output for g in groups if g.kind == "concat"] == cats
    assert [g.output for g in groups if g.kind == "add"] == adds
    assert all(len(g.inputs) == 2 for g in groups if g.kind == "add")


def test_sppf_concat_merges_through_max_pools(relu_yolo):
    _, gm = relu_yolo
    sppf = next(g for g in find_alignment_groups(gm) if g.output == "cat_4")
    assert sppf.inputs == ("model_9_cv1_act",)
    pools = [n for n in gm.graph.nodes if n.target == "model.9.m"]
    assert len(pools) == 3 and all(is_pass_through(gm, p) for p in pools)
    assert resolve_producer(gm, pools[-1]).name == "model_9_cv1_act"


def test_head_concats_reach_through_upsample_and_merge(relu_yolo):
    _, gm = relu_yolo
    groups = {g.output: g for g in find_alignment_groups(gm)}
    # layer 12: cat(upsample(layer 10), layer 6); layer 22: cat(layer 21, layer 10)
    assert groups["cat_5"].inputs == ("model_10_act", "model_6_cv3_act")
    assert groups["cat_11"].inputs == ("model_21_act", "model_10_act")
    assert groups["cat_5"].share_id == groups["cat_11"].share_id
    assert groups["cat_5"].share_id != groups["cat_6"].share_id


def test_merge_groups_union_find():
    groups = [Group("concat", ("a", "b"), "c"), Group("add", ("c", "d"), "e"), Group("add", ("e", "f"), "g"),
              Group("concat", ("h",), "i")]
    ids = merge_groups(groups, order="abcdefghi")
    assert ids["a"] == ids["b"] == ids["c"] == ids["d"]
    assert ids["e"] == ids["f"] != ids["a"]
    assert "g" not in ids  # an add's output is not tied to anything
    assert ids["h"] == ids["i"] and len(set(ids.values())) == 3
    assert ids["a"] == 0  # numbered by first appearance


def test_interpolate_modes():
    class Up(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2.0, mode="nearest") + F.interpolate(x, scale_factor=2.0,
                                                                                      mode="bilinear")

    gm = trace(Up())
    calls = [n for n in gm.graph.nodes if n.target is F.interpolate]
    assert [is_pass_through(gm, n) for n in calls] == [True, False]


def test_graphviz_marks_chains_and_groups(relu_yolo, tmp_path):
    _, gm = relu_yolo
    path = write_graphviz(gm, tmp_path / "g" / "yolo.gv", find_conv_bn_act(gm), find_alignment_groups(gm),
                          title='a "title"')
    text = path.read_text()
    assert text.startswith("digraph G {") and text.rstrip().endswith("}")
    assert text.count("subgraph cluster_chain_") == 57
    assert 'label="fuse conv+bn+relu"' in text
    assert "fillcolor" in text and 'label="a \\"title\\""' in text
    assert '"model_0_act" -> "model_1_conv";' in text


class _Head(nn.Module):
    """A leaf with three convs, the middle one kept float (as a per-layer rule leaves it)."""

    def __init__(self) -> None:
        super().__init__()
        spec = QuantSpec()
        self.m = nn.ModuleList([QATConv(nn.Conv2d(3, 4, 1), Pow2FakeQuantize(spec, True, 4)), nn.Conv2d(3, 4, 1),
                                QATConv(nn.Conv2d(3, 4, 1), Pow2FakeQuantize(spec, True, 4))])

    def forward(self, xs):
        return [m(x) for m, x in zip(self.m, xs)]


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = _Head()

    def forward(self, x):
        return self.head([x, x * 2, x * 3]), self.head([x, x])


def test_leaf_conv_pairing_counts_float_convs_and_raises_on_a_mismatch():
    gm = trace(_TwoHeads(), leaf_classes=("_Head",))
    first, second = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "head"]
    pairs = leaf_conv_inputs(gm, first)
    assert [(name, arg.name) for name, _, arg in pairs] == [("head.m.0", "x"), ("head.m.2", "mul_1")]
    assert all(isinstance(conv, QATConv) for _, conv, _ in pairs)
    with pytest.raises(ValueError, match="head: leaf with 3 convs called with 2 inputs"):
        leaf_conv_inputs(gm, second)


def test_set_submodule_puts_and_removes():
    root = nn.Sequential(nn.Sequential(nn.ReLU()))
    set_submodule(root, "0.1", nn.ReLU6())
    assert isinstance(root[0][1], nn.ReLU6)
    set_submodule(root, "0.1", None)
    assert len(root[0]) == 1
