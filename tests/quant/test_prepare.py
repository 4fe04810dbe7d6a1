"""Tests for quant/prepare.py on a ReLU yolov5n at 64 px: fusion, shared quantizers, rules, plan,
determinism, state dicts, deepcopy, Graphviz output, training and eval behaviour."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.common import Conv
from models.yolo import DetectionModel
from quant.config import LayerRule, QuantConfig
from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv, QATConvBnAct
from quant.prepare import ACT_QUANT, PreparedModel, prepare
from quant.schedule import iter_quantizers, set_bn_frozen, set_fake_quant

CFG = QuantConfig(leaf_modules=("Detect",))
X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def layer_index(name: str):
    match = re.match(r"model\.(\d+)", name)
    return int(match.group(1)) if match else None


def _model(act: str = "relu", seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel("yolov5n.yaml", act=act)
    with torch.no_grad():  # non-trivial BN statistics so that folding errors would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def relu_model():
    return _model()


@pytest.fixture(scope="module")
def prepared(relu_model):
    return prepare(relu_model.train(), X[:1], CFG, layer_index)


def _act_quant_targets(pm, node):
    """act_quant module names feeding ``node``."""
    return [a.target for a in node.all_input_nodes if a.op == "call_module" and a.target.startswith(ACT_QUANT)]


def _assert_same_outputs(a, b, atol=1e-5):
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-4)  # boxes in pixels
    for u, v in zip(a[1], b[1]):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=atol)


def test_every_conv_block_fused_and_hierarchy_kept(relu_model, prepared):
    assert isinstance(prepared, PreparedModel) and isinstance(prepared, torch.fx.GraphModule)
    n_blocks = sum(isinstance(m, Conv) for m in relu_model.modules())
    fused = [m for m in prepared.modules() if isinstance(m, QATConvBnAct)]
    assert len(fused) == n_blocks == 57
    assert all(isinstance(m.act, nn.ReLU) and isinstance(m.bn, nn.BatchNorm2d) for m in fused)
    assert isinstance(prepared.model, nn.Sequential) and type(prepared.model[-1]).__name__ == "Detect"
    assert isinstance(prepared.model[3], QATConvBnAct)
    assert all(isinstance(m, QATConv) for m in prepared.model[-1].m)
    torch.testing.assert_close(prepared.stride, relu_model.stride)
    assert prepared.names == relu_model.names and prepared.yaml == relu_model.yaml
    assert not any(isinstance(m, (QATConvBnAct, Pow2FakeQuantize)) for m in relu_model.modules())


def test_state_dict_keys_follow_the_original(relu_model, prepared):
    keys = set(prepared.state_dict())
    original = set(relu_model.state_dict())
    assert original <= keys  # a float checkpoint loads into the prepared model by name
    assert {"model.3.weight_fake_quant.exponent", "act_quant.input.exponent", "model.24.m.0.out_quant.exponent",
            "model.24.m.0.weight_fake_quant.exponent"} <= keys


def test_float_outputs_equal_when_fake_quant_off(relu_model, prepared):
    model, pm = relu_model.eval(), copy.deepcopy(prepared).eval()
    set_fake_quant(pm, False)
    with torch.no_grad():
        _assert_same_outputs(model(X), pm(X))


def test_silu_model_fuses_conv_bn_and_keeps_silu_float():
    model = _model("silu").eval()
    pm = prepare(model, X[:1], CFG, layer_index)
    fused = {n: m for n, m in pm.named_modules() if isinstance(m, QATConvBnAct)}
    assert len(fused) == 57 and "model.3.conv" in fused  # SiLU blocks keep their SiLU: conv-named
    assert all(isinstance(m.act, nn.Identity) for m in fused.values())
    assert isinstance(pm.model[3].act, nn.SiLU) and not hasattr(pm.model[3], "bn")
    assert "SiLU not fusable" in pm.plan.table()
    set_fake_quant(pm, False)
    with torch.no_grad():
        _assert_same_outputs(model(X), pm(X))


def test_concat_inputs_and_output_share_one_instance(prepared):
    cats = [n for n in prepared.graph.nodes if n.target is torch.cat]
    assert len(cats) == 13
    for cat in cats:
        targets = set(_act_quant_targets(prepared, cat))
        out = [u.target for u in cat.users]
        assert len(targets) == 1 and out == list(targets), cat.name
    quantizer = prepared.get_submodule(out[0])
    assert isinstance(quantizer, Pow2FakeQuantize)
    # head concats at layers 12 and 22 both read layer 10's output: one merged quantizer
    assert prepared.act_quant.model_22_concat is prepared.get_submodule(
        _act_quant_targets(prepared, cats[5])[0])


def test_sppf_concat_shares_through_max_pools(prepared):
    pools = [n for n in prepared.graph.nodes if n.target == "model.9.m"]
    first = pools[0].args[0]
    assert first.op == "call_module" and first.target == "act_quant.model_9_concat"
    cat = next(n for n in prepared.graph.nodes if n.target is torch.cat and pools[-1] in n.all_input_nodes)
    assert next(iter(cat.users)).target == first.target
    assert not any(a.target.startswith(ACT_QUANT) for p in pools for a in p.users if a.op == "call_module")


def test_add_inputs_share_output_has_its_own(prepared):
    adds = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 7
    for add in adds:
        ins = _act_quant_targets(prepared, add)
        out = next(iter(add.users)).target
        assert len(ins) == 2 and ins[0] == ins[1] and out.startswith(ACT_QUANT) and out != ins[0]


def test_signedness_and_input_quantizer(prepared):
    quantizers = dict(iter_quantizers(prepared))
    head = {n: q for n, q in quantizers.items() if n.endswith("out_quant")}
    assert len(head) == 3 and all(q.signed for q in head.values())
    acts = {n: q for n, q in quantizers.items() if n.startswith(ACT_QUANT)}
    assert acts and not any(q.signed for q in acts.values())  # all after ReLU
    inp = quantizers["act_quant.input"]
    assert inp.bits == 8 and float(inp.scale()) == 1 / 256
    weights = [q for n, q in quantizers.items() if n.endswith("weight_fake_quant")]
    assert len(weights) == 60 and all(q.signed and q.spec.per_channel for q in weights)


def test_rules_float_and_bits():
    cfg = QuantConfig(leaf_modules=("Detect",), rules=(
        LayerRule("model.3", float=True), LayerRule("layer:5", weight={"bits": 16}),
        LayerRule("model.24.m.1", float=True), LayerRule("layer:22", activation={"signed": True})))
    pm = prepare(_model(), X[:1], cfg, layer_index)
    assert type(pm.model[3]) is Conv and type(pm.model[3].conv) is nn.Conv2d
    assert not any(isinstance(m, Pow2FakeQuantize) for m in pm.model[3].modules())
    assert pm.model[5].weight_fake_quant.bits == 16 and pm.model[7].weight_fake_quant.bits == 8
    assert type(pm.model[24].m[1]) is nn.Conv2d and isinstance(pm.model[24].m[0], QATConv)
    # the float layer's ReLU output is quantized for its quantized readers (model.4.cv1 / cv2)
    node = next(n for n in pm.graph.nodes if n.target == "model.3.act")
    assert [u.target for u in node.users] == ["act_quant.model_3_act"]
    table = pm.plan.table()
    assert re.search(r"\n\s+3  model\.3 .*float \(rule\)", table)
    assert re.search(r"\n\s+5  model\.5 .*int16/ch", table)
    # the last concat of a merged set (layer 22, whose set also holds layer 12's) decides its spec
    assert pm.act_quant.model_22_concat.signed and not pm.act_quant.model_19_concat.signed


def test_plan_lists_every_layer(prepared):
    table = prepared.plan.table()
    layers = {e.layer for e in prepared.plan}
    assert layers >= set(range(25))
    names = {e.name for e in prepared.plan}
    assert {n for n, m in prepared.named_modules() if isinstance(m, QATConvBnAct)} <= names
    assert all(f"model.24.m.{i}" in table for i in range(3))
    assert len(table.splitlines()) == len(prepared.plan) + 2


@pytest.fixture(scope="module")
def trained(relu_model):
    """A prepared model after one training step's forward and backward (observers calibrated)."""
    pm = prepare(relu_model.train(), X[:1], CFG, layer_index).train()
    out = pm(X)
    sum(p.square().mean() for p in out).backward()
    return pm, out


def test_train_mode_output_structure_and_backward(relu_model, trained):
    pm, out = trained
    head = relu_model.model[-1]
    assert isinstance(out, list) and len(out) == head.nl
    for p, s in zip(out, (8, 16, 32)):
        assert p.shape == (2, head.na, 64 // s, 64 // s, head.no)
    grads = [p.grad for p in pm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert pm.model[0].conv.weight.grad.abs().sum() > 0
    assert all(bool(q.calibrated) for _, q in iter_quantizers(pm))


def test_deterministic_rebuild_and_state_dict_round_trip(relu_model, trained):
    a = trained[0]
    b = prepare(relu_model, X[:1], CFG, layer_index)
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    a, b = copy.deepcopy(a).eval(), b.eval()
    with torch.no_grad():
        _assert_same_outputs(a(X), b(X), atol=0)


def test_deepcopy_keeps_attributes_and_sharing(trained):
    prepared = trained[0]
    pm = copy.deepcopy(prepared).eval()
    assert pm.plan is not prepared.plan and len(pm.plan) == len(prepared.plan)
    torch.testing.assert_close(pm.stride, prepared.stride)
    assert pm.model[-1] is not prepared.model[-1]
    assert pm.act_quant.model_22_concat is pm.get_submodule("act_quant.model_22_concat")
    assert pm.model[3].weight_fake_quant is not prepared.model[3].weight_fake_quant
    with torch.no_grad():
        _assert_same_outputs(copy.deepcopy(prepared).eval()(X), pm(X), atol=0)


def test_deepcopy_keeps_one_observation_step_per_call(prepared):
    """A deep copy keeps the pre-hook that starts each call's observation step: the 'current' weight
    observer of the copy follows weights that shrink between two calls (without the hook it would merge
    the second call's range into the first's and keep the old exponent)."""
    from quant.schedule import begin_observation_step

    twin = copy.deepcopy(prepared).train()
    set_bn_frozen(twin, True)  # the folded weight is then the conv weight times fixed factors
    assert list(twin._forward_pre_hooks.values()) == [begin_observation_step]
    quantizer = twin.model[3].weight_fake_quant
    twin(X)
    before = quantizer.exponent.clone()
    with torch.no_grad():
        twin.model[3].conv.weight.mul_(0.25)
    twin(X)
    assert torch.equal(quantizer.exponent, before - 2)


def test_eval_mode_prepare_returns_decoded_boxes(relu_model):
    pm = prepare(relu_model.eval(), X[:1], CFG, layer_index)
    assert not pm.training and not pm.model[3].training
    with torch.no_grad():
        boxes, maps = pm(X)
    assert boxes.shape == (2, 3 * (64 + 16 + 4), 85) and len(maps) == 3
    assert not any(bool(q.calibrated) for n, q in iter_quantizers(pm) if n != "act_quant.input")


def test_bn_freeze_reaches_fused_modules(prepared):
    pm = copy.deepcopy(prepared)
    set_bn_frozen(pm, True)
    assert all(m.bn_frozen for m in pm.modules() if isinstance(m, QATConvBnAct))
    set_bn_frozen(pm, False)
    assert not any(m.bn_frozen for m in pm.modules() if isinstance(m, QATConvBnAct))


def test_fold_mode_prepare(relu_model):
    pm = prepare(relu_model.eval(), X[:1], QuantConfig(leaf_modules=("Detect",), bn_mode="fold"), layer_index)
    assert all(m.bn is None for m in pm.modules() if isinstance(m, QATConvBnAct))
    set_fake_quant(pm, False)
    with torch.no_grad():
        _assert_same_outputs(relu_model(X), pm(X))


def test_graph_files_written(relu_model, tmp_path):
    prepare(relu_model, X[:1], CFG, layer_index, graph_dir=tmp_path)
    before = (tmp_path / "before_prepare.gv").read_text()
    after = (tmp_path / "after_prepare.gv").read_text()
    assert "subgraph cluster_chain_" in before and "fillcolor" in before
    assert "shape=diamond" in after and "Pow2FakeQuantize" in after and "QATConvBnAct" in after


def test_missing_forward_argument_is_reported():
    class Two(nn.Module):
        def forward(self, x, scale):
            return x * scale

    with pytest.raises(ValueError, match="scale"):
        prepare(Two(), torch.zeros(1), QuantConfig())


class _Block(nn.Module):
    """A ResNet-style block: one ReLU module used twice, a residual add, ReLU after the add."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(x + y)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.blocks(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_any_traceable_model():
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 3, 16, 16)
    pm = prepare(net, x, QuantConfig())
    names = {n for n, m in pm.named_modules() if isinstance(m, QATConvBnAct)}
    assert names == {"stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2"}
    assert isinstance(pm.blocks[0].relu, nn.ReLU)  # still used after the add: kept in its block
    assert isinstance(pm.fc, nn.Linear)  # not a conv: stays float
    adds = [n for n in pm.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert all(len(set(_act_quant_targets(pm, a))) == 1 for a in adds)
    # the stem's ReLU output shares the add's input quantizer with a BN output: signed
    assert pm.act_quant.blocks_0_add_in.signed and not pm.act_quant.blocks_0_conv1.signed
    set_fake_quant(pm, False)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), net(x), rtol=1e-5, atol=1e-5)


class _ConvThenLinear(torch.nn.Module):
    """A classifier: a quantized conv block, then layers prepare leaves float (BN on its own, a Linear)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.norm = torch.nn.BatchNorm1d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.norm(self.pool(self.conv(x)).flatten(1)))


def test_every_module_left_float_has_a_plan_row_saying_why():
    pm = prepare(_ConvThenLinear(), (torch.rand(2, 3, 16, 16),), QuantConfig())
    rows = {e.name: e for e in pm.plan if e.kind == "float_module"}
    assert set(rows) == {"norm", "fc"}
    assert "Linear: prepare quantizes Conv2d weights only" in rows["fc"].float_reason
    assert "BatchNorm1d" in rows["norm"].float_reason
    table = pm.plan.table()
    assert "fc" in table and "float_module" in table
    assert not any(e.name.startswith("conv") and e.kind == "float_module" for e in pm.plan)  # fused: quantized
