"""prepare(): turn a float model into a QAT model with power-of-2 fake quantization.

Steps (each a small pass over one fx graph; the caller's model is never modified):

1. trace (config.leaf_modules stay opaque; forward arguments not given in ``example_inputs`` are
   fixed to their defaults, e.g. YOLO's ``augment=False``);
2. fuse every Conv2d(+BN)(+ReLU/ReLU6) chain into one :class:`~quant.fused.QATConvBnAct`;
3. swap the Conv2d modules inside leaf modules (a detection head) for :class:`~quant.fused.QATConv`
   with a signed output quantizer, so the leaf's own forward keeps working;
4. insert activation quantizers as graph nodes after every quantized producer (model input, fused
   convs, adds, concats) and on float tensors that quantized consumers read; tensors that must
   share a scale (concat inputs and output, add inputs; merged through max-pool/upsample/reshape)
   use the very same quantizer instance.

Naming (deterministic, so a checkpoint is rebuilt by calling prepare again and loading the state
dict): a fused chain takes its parent block's name when the chain uses every child of that block
(YOLO ``Conv`` with ReLU: ``model.3``, keys ``model.3.conv.weight``, ``model.3.bn.*``,
``model.3.weight_fake_quant.*``), otherwise the conv's own name (SiLU models: ``model.3.conv``, the
block keeps its SiLU).  Config rules see the block name in both cases; add/concat nodes are looked
up by the module whose forward calls them ('model.2.m.0', 'model.12').  Activation quantizers live
in the ModuleDict ``act_quant``, one entry per set of tensors sharing a scale, named after the
last concat of the set (``act_quant.model_22_concat``; its spec decides the set's), else the last
add whose inputs it holds (``act_quant.model_4_m_1_add_in``), else its producer
(``act_quant.model_3``, ``act_quant.model_2_m_0_add`` for an add's output, ``act_quant.input``).
A set is unsigned only when every member is non-negative (ReLU/ReLU6 outputs, the [0,1] input).
Head convs keep their output quantizer inside: ``model.24.m.0.out_quant``.

Example:
    >>> qmodel = prepare(model, torch.zeros(1, 3, 64, 64), QuantConfig(leaf_modules=("Detect",)))
    >>> print(qmodel.plan.table())
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fq_ops import probe_half_kernels
from quant.fused import QATConv, QATConvBnAct
from quant.graph import (Chain, activation_kind, find_alignment_groups, find_conv_bn_act, group_of,
                         is_pass_through, link_input_quantizers, merge_groups, owner_name, resolve_producer,
                         set_submodule, trace)
from quant.graphviz import write_graphviz
from quant.plan import PlanEntry, QuantPlan, check_rules_match, float_module_entries
from quant.schedule import begin_observation_step

__all__ = ["ACT_QUANT", "PlanEntry", "QuantPlan", "PreparedModel", "check_rules_match", "prepare"]

LOGGER = logging.getLogger(__name__)
ACT_QUANT = "act_quant"  # the ModuleDict holding every activation quantizer


class PreparedModel(fx.GraphModule):
    """The prepared model: a GraphModule that keeps the original module hierarchy (``model.model[-1]``
    still finds a YOLO head), the original's plain attributes (``stride``, ``names``, ...), ``plan``,
    the ``quant_config`` it was prepared with and the ``example_shape`` of its (first) example input,
    which is all it takes to prepare it again.  Deep copies (EMA) keep those attributes too."""

    quant_config: QuantConfig
    example_shape: tuple[int, ...]

    def __deepcopy__(self, memo: dict) -> "PreparedModel":
        res = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if not key.startswith("_") and key not in res.__dict__:
                res.__dict__[key] = copy.deepcopy(value, memo)
        return res

    def _apply(self, fn, *args, **kwargs):
        """After a move (.to, .cuda, .half, ...) learn which half-precision fake-quant kernels the new
        device has, once per device type: decided here, never by a failure inside forward."""
        out = super()._apply(fn, *args, **kwargs)
        param = next(self.parameters(), None)
        if param is not None:
            probe_half_kernels(param.device)
        return out


@dataclass
class _Producer:
    """What a quantized producer needs for its output quantizer."""

    spec: QuantSpec
    kind: str  # 'input' | 'conv' | 'add' | 'concat'
    key: str  # act_quant name when this producer anchors its tensor set
    unsigned: bool = False


@dataclass
class _Ctx:
    root: nn.Module
    graph: fx.Graph
    config: QuantConfig
    index_of: Callable[[str], Optional[int]]
    producers: dict[str, _Producer] = field(default_factory=dict)  # node name -> producer
    consumers: set[str] = field(default_factory=set)  # node names that need quantized inputs
    entries: dict[str, PlanEntry] = field(default_factory=dict)  # node name -> plan row


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "root"


def _weight_quantizer(spec: QuantSpec, channels: int) -> Pow2FakeQuantize:
    return Pow2FakeQuantize(spec, signed=True if spec.signed is None else spec.signed, num_channels=channels)


# ------------------------------------------------------------------------------------ step 2: fuse
def _chain_names(ctx: _Ctx, chain: Chain, act_is_module: bool, targets: set[str]) -> tuple[str, str]:
    """(module name of the fused block, name the config rules see) — see the module docstring."""
    parent = chain.conv.rpartition(".")[0]
    if not parent:
        return chain.conv, chain.conv
    fused = {chain.conv, chain.bn} | ({chain.act} if chain.fused_act and act_is_module else set())
    children = {f"{parent}.{n}" for n, _ in ctx.root.get_submodule(parent).named_children()}
    inside = {t for t in targets if t.startswith(parent + ".")}
    if children <= fused and inside <= fused:
        return parent, parent
    with_act = fused | ({chain.act} if act_is_module else set())
    return chain.conv, (parent if children <= with_act else chain.conv)


def _fuse_chain(ctx: _Ctx, chain: Chain, nodes: dict[str, fx.Node], targets: set[str]) -> None:
    act_is_module = chain.act is not None and chain.act in targets
    place, rule_name = _chain_names(ctx, chain, act_is_module, targets)
    layer = ctx.index_of(rule_name)
    quantize, wspec, aspec = ctx.config.resolve(rule_name, layer)
    first = nodes[chain.nodes[0]]
    if not quantize:
        ctx.entries[first.name] = PlanEntry(rule_name, "conv", layer, chain.describe(), float_reason="float (rule)")
        return
    conv = ctx.root.get_submodule(chain.conv)
    bn = ctx.root.get_submodule(chain.bn) if chain.bn else None
    fused = QATConvBnAct(conv, bn, chain.fused_act, _weight_quantizer(wspec, conv.out_channels), ctx.config.bn_mode)
    chain_nodes = [nodes[n] for n in chain.nodes]
    with ctx.graph.inserting_before(first):
        new = ctx.graph.call_module(place, first.args, first.kwargs)
    new.meta.update(first.meta)
    chain_nodes[-1].replace_all_uses_with(new)
    for node in reversed(chain_nodes):
        ctx.graph.erase_node(node)
    set_submodule(ctx.root, place, fused)
    if place == chain.conv:  # the block keeps its other children; drop the ones now inside `fused`
        remaining = {n.target for n in ctx.graph.nodes if n.op in ("call_module", "get_attr")}
        for name in (chain.bn, chain.act if chain.fused_act and act_is_module else None):
            if name and name not in remaining:
                set_submodule(ctx.root, name, None)
    ctx.producers[new.name] = _Producer(aspec, "conv", _key(place), unsigned=chain.fused_act is not None)
    ctx.consumers.add(new.name)
    note = ""
    if chain.act_kind == "other":  # e.g. SiLU: an integer conv cannot apply it, so it runs in float
        kind = type(ctx.root.get_submodule(chain.act)).__name__ if act_is_module else chain.act
        note = f"{kind} not fusable: runs in float"
    ctx.entries[new.name] = PlanEntry(rule_name, "conv", layer, chain.describe(), wspec, aspec, float_reason=note)


# ------------------------------------------------------------------------------------ step 3: leaves
def _swap_leaf_convs(ctx: _Ctx) -> None:
    done: set[str] = set()
    for node in ctx.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        leaf = ctx.root.get_submodule(node.target)
        if type(leaf).__name__ not in ctx.config.leaf_modules:
            continue
        done.add(node.target)
        convs = [(n, m) for n, m in leaf.named_modules() if type(m) is nn.Conv2d]
        for i, (sub, conv) in enumerate(convs):
            name = f"{node.target}.{sub}"
            layer = ctx.index_of(name)
            quantize, wspec, aspec = ctx.config.resolve(name, layer)
            row = f"{node.name}:{i}"
            if not quantize:
                ctx.entries[row] = PlanEntry(name, "head_conv", layer, "conv", float_reason="float (rule)")
                continue
            signed = True if aspec.signed is None else aspec.signed
            out_fq = Pow2FakeQuantize(aspec, signed=signed)
            set_submodule(ctx.root, name, QATConv(conv, _weight_quantizer(wspec, conv.out_channels), out_fq))
            ctx.consumers.add(node.name)
            ctx.entries[row] = PlanEntry(name, "head_conv", layer, "conv", wspec, aspec, signed, f"{name}.out_quant")


# ------------------------------------------------------------------------------------ step 4: activations
def _classify_ops(ctx: _Ctx) -> list:
    """Register the input and quantized add/concat nodes; return their Groups."""
    groups = []
    for node in ctx.graph.nodes:
        if node.op == "placeholder" and ctx.config.quantize_input:
            key = "input" if node.name == next(iter(ctx.graph.nodes)).name else f"input_{node.name}"
            ctx.producers[node.name] = _Producer(ctx.config.input, "input", key, ctx.config.input.signed is False)
            continue
        group = group_of(ctx.root, node)
        if group is None:
            continue
        owner = owner_name(node)
        layer = ctx.index_of(owner) if owner else None
        quantize, _, aspec = ctx.config.resolve(owner or node.name, layer)
        name = f"{owner}.{group.kind}" if owner else node.name
        if not quantize:
            ctx.entries[node.name] = PlanEntry(name, group.kind, layer, float_reason="float (rule)")
            continue
        groups.append(group)
        ctx.consumers.add(node.name)
        ctx.producers[node.name] = _Producer(aspec, group.kind, _key(name))
        ctx.entries[node.name] = PlanEntry(name, group.kind, layer, activation=aspec)
    return groups


def _needed_values(ctx: _Ctx, nodes: dict[str, fx.Node]) -> list[fx.Node]:
    """Tensors that get a quantizer, in graph order: outputs of quantized producers (except an
    input nobody quantized reads) and float tensors read by quantized consumers."""
    needed: set[str] = {n for n, p in ctx.producers.items() if p.kind != "input" and nodes[n].users}
    for name in ctx.consumers:
        for arg in nodes[name].all_input_nodes:
            src = resolve_producer(ctx.root, arg)
            if src.op == "get_attr" or (src.op == "placeholder" and not ctx.config.quantize_input):
                continue
            needed.add(src.name)
    return [n for n in ctx.graph.nodes if n.name in needed]


def _member_unsigned(ctx: _Ctx, node: fx.Node, set_of: dict[str, Any], unsigned: dict[Any, bool]) -> bool:
    p = ctx.producers.get(node.name)
    if p is None:  # a float tensor: only a ReLU guarantees non-negative values
        return activation_kind(ctx.root, node) in ("relu", "relu6")
    if p.kind == "concat":
        return True  # as signed as the tensors it joins (its own set)
    if p.kind == "add":
        return all(unsigned.get(set_of.get(resolve_producer(ctx.root, a).name), False) for a in node.args[:2])
    return p.unsigned


def _set_signedness(ctx: _Ctx, sets: dict[Any, list[fx.Node]], set_of: dict[str, Any],
                    specs: dict[Any, QuantSpec]) -> dict[Any, bool]:
    """Unsigned sets: every member non-negative.  Iterated to a fixed point because an add's sign
    depends on its inputs' set (optimistic start, values only ever turn signed)."""
    unsigned = {sid: True for sid in sets}
    changed = True
    while changed:
        changed = False
        for sid, members in sets.items():
            forced = specs[sid].signed
            value = (not forced) if forced is not None else all(
                _member_unsigned(ctx, m, set_of, unsigned) for m in members)
            if value != unsigned[sid]:
                unsigned[sid], changed = value, True
    return unsigned


def _anchor(ctx: _Ctx, members: list[fx.Node], ties: list[str]) -> tuple[QuantSpec, str]:
    """Spec and quantizer name of a tensor set: from the last concat that ties it, else the last add
    whose inputs it holds (name + '_in'), else its last quantized producer, else its last member."""
    concats = [t for t in ties if ctx.producers[t].kind == "concat"]
    if concats or ties:
        p = ctx.producers[(concats or ties)[-1]]
        return p.spec, p.key if concats else f"{p.key}_in"
    quantized = [m for m in members if m.name in ctx.producers]
    if quantized:
        p = ctx.producers[quantized[-1].name]
        return p.spec, p.key
    node = members[-1]
    owner = owner_name(node) or node.name
    return ctx.config.resolve(owner, ctx.index_of(owner))[2], _key(owner)


def _insert_quantizer_nodes(ctx: _Ctx, target: str, members: list[fx.Node]) -> None:
    first_op = next(n for n in ctx.graph.nodes if n.op != "placeholder")
    for value in members:
        users = list(value.users)
        if value.op == "placeholder":
            with ctx.graph.inserting_before(first_op):
                qnode = ctx.graph.call_module(target, (value,))
        else:
            with ctx.graph.inserting_after(value):
                qnode = ctx.graph.call_module(target, (value,))
        if value.name not in ctx.producers:  # float tensor: only quantized readers see it quantized
            users = [u for u in users if u.name in ctx.consumers or is_pass_through(ctx.root, u)]
        for user in users:
            user.replace_input_with(value, qnode)


def _insert_act_quantizers(ctx: _Ctx) -> dict[str, tuple]:
    """Step 4; returns {tensor node name: (quantizer name, shared set id or None, signed, spec)}."""
    groups = _classify_ops(ctx)
    nodes = {n.name: n for n in ctx.graph.nodes}
    merged = merge_groups(groups, order=list(nodes))
    sets: dict[Any, list[fx.Node]] = {}
    for value in _needed_values(ctx, nodes):
        sets.setdefault(merged.get(value.name, ("solo", value.name)), []).append(value)
    set_of = {m.name: sid for sid, members in sets.items() for m in members}
    ties: dict[Any, list[str]] = {sid: [] for sid in sets}
    for g in groups:
        sid = set_of.get(g.inputs[0])
        if sid is not None:
            ties[sid].append(g.output)
    anchors = {sid: _anchor(ctx, members, ties[sid]) for sid, members in sets.items()}
    specs = {sid: spec for sid, (spec, _) in anchors.items()}
    unsigned = _set_signedness(ctx, sets, set_of, specs)
    holder = nn.ModuleDict()
    if hasattr(ctx.root, ACT_QUANT):
        raise ValueError(f"{type(ctx.root).__name__} already has an attribute {ACT_QUANT!r}; cannot prepare it")
    ctx.root.add_module(ACT_QUANT, holder)
    result, shared = {}, 0
    for sid, members in sets.items():
        spec, key = anchors[sid]
        if spec.per_channel:
            raise ValueError(f"{members[-1].name}: per-channel activation quantization is not supported")
        while key in holder:
            key = f"{key}_"
        holder[key] = Pow2FakeQuantize(spec, signed=not unsigned[sid])
        target = f"{ACT_QUANT}.{key}"
        _insert_quantizer_nodes(ctx, target, members)
        group = shared if len(members) > 1 else None
        shared += len(members) > 1
        for m in members:
            result[m.name] = (target, group, not unsigned[sid], spec)
    return result


# ------------------------------------------------------------------------------------ plan + build
def _build_plan(ctx: _Ctx, order: list[str], quant_of: dict[str, tuple]) -> QuantPlan:
    rows = dict(ctx.entries)
    by_name = {n.name: n for n in ctx.graph.nodes}
    for name in order:
        node = by_name.get(name)
        if node is None or name in rows:
            continue
        if node.op == "placeholder" and name in quant_of:
            rows[name] = PlanEntry("input", "input", activation=ctx.config.input)
        elif node.op == "call_module" and is_pass_through(ctx.root, node):
            src = resolve_producer(ctx.root, node)
            if src.op == "call_module" and str(src.target).startswith(ACT_QUANT + "."):
                src = src.args[0]  # the tensor that quantizer belongs to
            rows[name] = PlanEntry(str(node.target), "pass", ctx.index_of(str(node.target)),
                                   float_reason="shares its input's quantizer" if src.name in quant_of else "float")
            quant_of.setdefault(name, quant_of.get(src.name, ("", None, None, None)))
        elif name in quant_of or activation_kind(ctx.root, node) == "other":
            owner = owner_name(node) or name
            rows[name] = PlanEntry(owner, "float_op", ctx.index_of(owner), float_reason="computed in float")
    plan = QuantPlan()
    for key in sorted(rows, key=lambda k: (order.index(k.split(":")[0]), k)):
        entry = rows[key]
        target, group, signed, spec = quant_of.get(key, ("", None, None, None))
        if target and not entry.quantizer:  # the spec of the (possibly shared) quantizer it really uses
            entry.quantizer, entry.group, entry.signed, entry.activation = target, group, signed, spec
        plan.append(entry)
    return plan


def _build_module(ctx: _Ctx, model: nn.Module, plan: QuantPlan) -> PreparedModel:
    ctx.graph.lint()
    prepared = PreparedModel(ctx.root, ctx.graph, class_name=type(model).__name__)
    # GraphModule copies only the modules the graph calls, into plain containers; put the real
    # hierarchy back so indexing (model.model[-1]) and state_dict keys match the original.
    for name, child in ctx.root.named_children():
        setattr(prepared, name, child)
    for name, value in vars(model).items():
        if not name.startswith("_") and name != "training" and not hasattr(prepared, name):
            setattr(prepared, name, copy.deepcopy(value))
    prepared.plan = plan
    return prepared


def _concrete_args(model: nn.Module, n_inputs: int) -> Optional[dict[str, Any]]:
    """Forward parameters beyond the example inputs are fixed to their defaults while tracing."""
    params = list(inspect.signature(model.forward).parameters.values())[n_inputs:]
    fixed = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ValueError(f"{type(model).__name__}.forward needs argument {p.name!r}: pass it in example_inputs")
        fixed[p.name] = p.default
    return fixed or None


def prepare(model: nn.Module, example_inputs: Union[torch.Tensor, tuple], config: QuantConfig,
            layer_index_of: Optional[Callable[[str], Optional[int]]] = None,
            graph_dir: Optional[Union[str, Path]] = None) -> PreparedModel:
    """Return a QAT copy of ``model`` (see the module docstring); ``model`` itself is not changed.

    ``example_inputs`` (a tensor or tuple) is run once through the result, in eval mode without
    gradients, to check it works.  ``layer_index_of`` maps a module name to a layer index for
    ``layer:<i>`` rules.  ``graph_dir``: write before_prepare.gv / after_prepare.gv there.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    index_of = layer_index_of or (lambda name: None)
    param = next(model.parameters(), None)
    root = copy.deepcopy(model)
    traced = trace(root, config.leaf_modules, _concrete_args(model, len(inputs)))
    chains = find_conv_bn_act(traced)
    if graph_dir is not None:
        write_graphviz(traced, Path(graph_dir) / "before_prepare.gv", chains, find_alignment_groups(traced),
                       title=f"{type(model).__name__}: traced")
    graph = traced.graph
    graph.owning_module = None  # module lookups go to `root`, which receives the new modules
    ctx = _Ctx(root, graph, config, index_of)
    nodes = {n.name: n for n in graph.nodes}
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for chain in chains:
        _fuse_chain(ctx, chain, nodes, targets)
    _swap_leaf_convs(ctx)
    order = [n.name for n in graph.nodes]
    quant_of = _insert_act_quantizers(ctx)
    prepared = _build_module(ctx, model, _build_plan(ctx, order, quant_of))
    prepared.quant_config, prepared.example_shape = config, tuple(inputs[0].shape)
    prepared.plan.extend(float_module_entries(prepared, prepared.plan))
    prepared.to(param.device if param is not None else "cpu")  # (also learns that device's kernels)
    prepared.train(model.training)
    prepared.register_forward_pre_hook(begin_observation_step)
    link_input_quantizers(prepared)
    _check_runs(prepared, inputs)
    if graph_dir is not None:
        write_graphviz(prepared, Path(graph_dir) / "after_prepare.gv", groups=find_alignment_groups(prepared),
                       title=f"{type(model).__name__}: prepared")
    LOGGER.info("prepare: %d fused convs, %d quantizers", sum(e.kind == "conv" and e.weight is not None
                                                               for e in prepared.plan),
                len({id(m) for m in prepared.modules() if isinstance(m, Pow2FakeQuantize)}))
    return prepared


@torch.no_grad()
def _check_runs(prepared: nn.Module, inputs: tuple) -> None:
    """One eval-mode forward: observers and BN statistics are untouched in eval mode."""
    was_training = prepared.training
    prepared.eval()
    try:
        prepared(*inputs)
    except RuntimeError as err:
        raise RuntimeError(f"prepared {type(prepared).__name__} failed on the example inputs: {err}") from err
    finally:
        prepared.train(was_training)
