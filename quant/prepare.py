"""prepare(): turn a float model into a QAT model with power-of-2 fake quantization.

Steps (each a small pass over one fx graph; the caller's model is never modified):

1. trace (config.leaf_modules stay opaque; forward arguments not given in ``example_inputs`` are
   fixed to their defaults, e.g. YOLO's ``augment=False``);
2. fuse every Conv2d(+BN)(+ReLU/ReLU6) chain into one :class:`~quant.fused.QATConvBnAct`;
3. swap the Conv2d modules inside leaf modules (a detection head) for :class:`~quant.fused.QATConv`
   with a signed output quantizer, so the leaf's own forward keeps working;
4. (:mod:`quant.act_quant`) insert activation quantizers as graph nodes after every quantized producer (model input, fused
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
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from quant.act_quant import ACT_QUANT, PrepareContext, Producer, insert_act_quantizers, module_key
from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fq_ops import probe_half_kernels
from quant.fused import QATConv, QATConvBnAct
from quant.graph import (Chain, activation_kind, find_alignment_groups, find_conv_bn_act, is_pass_through,
                         link_input_quantizers, owner_name, resolve_producer, set_submodule, trace)
from quant.graphviz import write_graphviz
from quant.plan import PlanEntry, QuantPlan, check_rules_match, float_module_entries
from quant.schedule import begin_observation_step

__all__ = ["ACT_QUANT", "PlanEntry", "QuantPlan", "PreparedModel", "check_rules_match", "prepare"]

LOGGER = logging.getLogger(__name__)


class PreparedModel(fx.GraphModule):
    """The prepared model: a GraphModule that keeps the original module hierarchy (``model.model[-1]``
    still finds a YOLO head), the original's plain attributes (``stride``, ``names``, ...), ``plan``,
    the ``quant_config`` it was prepared with and the ``example_shape`` of its (first) example input,
    which is all it takes to prepare it again.  Deep copies (EMA) keep those attributes too, and the
    forward pre-hook that makes each call one observation step."""

    quant_config: QuantConfig
    example_shape: tuple[int, ...]

    def __deepcopy__(self, memo: dict) -> "PreparedModel":
        res = super().__deepcopy__(memo)
        for key, value in self.__dict__.items():
            if not key.startswith("_") and key not in res.__dict__:
                res.__dict__[key] = copy.deepcopy(value, memo)
        if any(hook is begin_observation_step for hook in self._forward_pre_hooks.values()):
            res.register_forward_pre_hook(begin_observation_step)  # GraphModule's deep copy drops forward hooks
        return res

    def _apply(self, fn, *args, **kwargs):
        """After a move (.to, .cuda, .half, ...) learn which half-precision fake-quant kernels the new
        device has, once per device type: decided here, never by a failure inside forward."""
        out = super()._apply(fn, *args, **kwargs)
        param = next(self.parameters(), None)
        if param is not None:
            probe_half_kernels(param.device)
        return out


def _weight_quantizer(spec: QuantSpec, channels: int) -> Pow2FakeQuantize:
    return Pow2FakeQuantize(spec, signed=True if spec.signed is None else spec.signed, num_channels=channels)


# ------------------------------------------------------------------------------------ step 2: fuse
def _chain_names(ctx: PrepareContext, chain: Chain, act_is_module: bool, targets: set[str]) -> tuple[str, str]:
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


def _fuse_chain(ctx: PrepareContext, chain: Chain, nodes: dict[str, fx.Node], targets: set[str]) -> None:
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
    ctx.producers[new.name] = Producer(aspec, "conv", module_key(place), unsigned=chain.fused_act is not None)
    ctx.consumers.add(new.name)
    note = ""
    if chain.act_kind == "other":  # e.g. SiLU: an integer conv cannot apply it, so it runs in float
        kind = type(ctx.root.get_submodule(chain.act)).__name__ if act_is_module else chain.act
        note = f"{kind} not fusable: runs in float"
    ctx.entries[new.name] = PlanEntry(rule_name, "conv", layer, chain.describe(), wspec, aspec, float_reason=note)


# ------------------------------------------------------------------------------------ step 3: leaves
def _swap_leaf_convs(ctx: PrepareContext) -> None:
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


# ------------------------------------------------------------------------------------ plan + build
def _build_plan(ctx: PrepareContext, order: list[str], quant_of: dict[str, tuple]) -> QuantPlan:
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


def _build_module(ctx: PrepareContext, model: nn.Module, plan: QuantPlan) -> PreparedModel:
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
    ctx = PrepareContext(root, graph, config, index_of)
    nodes = {n.name: n for n in graph.nodes}
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for chain in chains:
        _fuse_chain(ctx, chain, nodes, targets)
    _swap_leaf_convs(ctx)
    order = [n.name for n in graph.nodes]
    quant_of = insert_act_quantizers(ctx)
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
