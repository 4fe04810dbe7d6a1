"""Step 4 of :func:`quant.prepare.prepare`: activation quantizers as graph nodes after every quantized
producer (model input, fused convs, adds, concats) and on the float tensors quantized consumers read.
Tensors that must share a scale (concat inputs and output, add inputs; merged through max-pool,
upsample and reshapes) get the very same quantizer instance, named and specified after the set's
anchor (its last concat, else the last add holding it, else its producer); a set is unsigned only
when every member is non-negative.  Also the context the steps of prepare share."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.fx as fx
from torch import nn

from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.graph import activation_kind, group_of, is_pass_through, merge_groups, owner_name, resolve_producer
from quant.plan import PlanEntry

__all__ = ["ACT_QUANT", "PrepareContext", "Producer", "insert_act_quantizers", "module_key"]

ACT_QUANT = "act_quant"  # the ModuleDict holding every activation quantizer


@dataclass
class Producer:
    """What a quantized producer needs for its output quantizer."""

    spec: QuantSpec
    kind: str  # 'input' | 'conv' | 'add' | 'concat'
    key: str  # act_quant name when this producer anchors its tensor set
    unsigned: bool = False


@dataclass
class PrepareContext:
    """What the steps of prepare() share: the module tree and graph being rewritten, the config, and
    what the steps found (quantized producers, nodes that need quantized inputs, plan rows so far)."""

    root: nn.Module
    graph: fx.Graph
    config: QuantConfig
    index_of: Callable[[str], Optional[int]]
    producers: dict[str, Producer] = field(default_factory=dict)  # node name -> producer
    consumers: set[str] = field(default_factory=set)  # node names that need quantized inputs
    entries: dict[str, PlanEntry] = field(default_factory=dict)  # node name -> plan row


def module_key(name: str) -> str:
    """A node or module name as a ModuleDict key."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name) or "root"


def _classify_ops(ctx: PrepareContext) -> list:
    """Register the input and quantized add/concat nodes; return their Groups."""
    groups = []
    for node in ctx.graph.nodes:
        if node.op == "placeholder" and ctx.config.quantize_input:
            key = "input" if node.name == next(iter(ctx.graph.nodes)).name else f"input_{node.name}"
            ctx.producers[node.name] = Producer(ctx.config.input, "input", key, ctx.config.input.signed is False)
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
        ctx.producers[node.name] = Producer(aspec, group.kind, module_key(name))
        ctx.entries[node.name] = PlanEntry(name, group.kind, layer, activation=aspec)
    return groups


def _needed_values(ctx: PrepareContext, nodes: dict[str, fx.Node]) -> list[fx.Node]:
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


def _member_unsigned(ctx: PrepareContext, node: fx.Node, set_of: dict[str, Any], unsigned: dict[Any, bool]) -> bool:
    p = ctx.producers.get(node.name)
    if p is None:  # a float tensor: only a ReLU guarantees non-negative values
        return activation_kind(ctx.root, node) in ("relu", "relu6")
    if p.kind == "concat":
        return True  # as signed as the tensors it joins (its own set)
    if p.kind == "add":
        return all(unsigned.get(set_of.get(resolve_producer(ctx.root, a).name), False) for a in node.args[:2])
    return p.unsigned


def _set_signedness(ctx: PrepareContext, sets: dict[Any, list[fx.Node]], set_of: dict[str, Any],
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


def _anchor(ctx: PrepareContext, members: list[fx.Node], ties: list[str]) -> tuple[QuantSpec, str]:
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
    return ctx.config.resolve(owner, ctx.index_of(owner))[2], module_key(owner)


def _insert_quantizer_nodes(ctx: PrepareContext, target: str, members: list[fx.Node]) -> None:
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


def insert_act_quantizers(ctx: PrepareContext) -> dict[str, tuple]:
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
