"""Graph analysis for quantization: tracing, Conv->BN->act chains, alignment groups, shared helpers.

Everything here reads a ``torch.fx`` graph and returns plain descriptions; nothing changes the
model (``set_submodule`` aside, the one swap helper prepare and export share).  :mod:`quant.prepare`
turns the descriptions into module swaps and quantizer nodes; :mod:`quant.graphviz` draws them.

Example:
    >>> gm = trace(model, leaf_classes=("Detect",), concrete_args={"augment": False})
    >>> chains = find_conv_bn_act(gm)        # one Chain per traced Conv2d
    >>> groups = find_alignment_groups(gm)   # one Group per torch.cat / tensor add
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConv, QATConvBnAct

__all__ = ["QuantTracer", "trace", "Chain", "find_conv_bn_act", "Group", "find_alignment_groups",
           "group_of", "merge_groups", "resolve_producer", "is_pass_through", "is_add", "is_concat", "owner_name",
           "activation_kind", "set_submodule", "input_quantizer_of", "leaf_conv_inputs"]

LOGGER = logging.getLogger(__name__)

# Activations that fold into an integer conv as a clamp (their output is unsigned).
_FUSABLE_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_FUSABLE_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_OTHER_ACT_MODULES = (nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
                      nn.Mish, nn.ELU, nn.PReLU)
_OTHER_ACT_FUNCTIONS = {F.silu, F.leaky_relu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.gelu,
                        F.mish, F.elu}

# Ops whose output lies on the same quantization grid as their input (they only move, select or
# repeat values), so they reuse the producer's quantizer instead of getting their own.
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Flatten,
                 nn.Unflatten, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_PASS_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d, torch.flatten, torch.reshape,
                   torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
                   operator.getitem, F.pixel_shuffle, F.pixel_unshuffle}
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "chunk", "split", "clone", "detach", "view_as", "reshape_as"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class QuantTracer(fx.Tracer):
    """An fx tracer that also keeps modules whose class name is in ``leaf_classes`` as leaves.

    Matching by class *name* keeps quant/ free of model imports (YOLO passes ``('Detect',)``).
    """

    def __init__(self, leaf_classes: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_classes = frozenset(leaf_classes)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m).__name__ in self.leaf_classes or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_classes: Iterable[str] = (),
          concrete_args: Optional[dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolically trace ``model`` (not copied) into a GraphModule; named leaf classes stay opaque."""
    tracer = QuantTracer(leaf_classes)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError) as err:
        raise ValueError(f"{type(model).__name__}: torch.fx could not trace the model ({err}); "
                         f"mark untraceable blocks as leaf modules (leaf_modules in the quant config)") from err
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


# ------------------------------------------------------------------------------------ node kinds
def _module(gm: nn.Module, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def _is_relu_method(node: fx.Node) -> Optional[str]:
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def activation_kind(gm: nn.Module, node: fx.Node) -> Optional[str]:
    """'relu' / 'relu6' for a fusable activation node, 'other' for any other activation, else None."""
    mod = _module(gm, node)
    if mod is not None:
        for cls, kind in _FUSABLE_ACT_MODULES.items():
            if type(mod) is cls:
                return kind
        return "other" if isinstance(mod, _OTHER_ACT_MODULES) else None
    if node.op == "call_function":
        if node.target in _FUSABLE_ACT_FUNCTIONS:
            return _FUSABLE_ACT_FUNCTIONS[node.target]
        return "other" if node.target in _OTHER_ACT_FUNCTIONS else None
    return _is_relu_method(node)


def is_pass_through(gm: nn.Module, node: fx.Node) -> bool:
    """True for ops that keep their input's quantization grid (pooling by max, nearest upsample,
    reshapes, slicing); they reuse the producer's quantizer."""
    mod = _module(gm, node)
    if mod is not None:
        if isinstance(mod, nn.Upsample):
            return mod.mode == "nearest"
        return isinstance(mod, _PASS_MODULES)
    if node.op == "call_function":
        if node.target is F.interpolate:
            return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def is_add(node: fx.Node) -> bool:
    """A tensor + tensor add (adds of a constant are not alignment points)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        args = node.args[:2]
    elif node.op == "call_method" and node.target in ("add", "add_"):
        args = node.args[:2]
    else:
        return False
    return len(args) == 2 and all(isinstance(a, fx.Node) for a in args)


def concat_inputs(node: fx.Node) -> list[fx.Node]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", node.kwargs.get("tensor", ()))
    return [t for t in tensors if isinstance(t, fx.Node)]


def resolve_producer(gm: nn.Module, node: fx.Node) -> fx.Node:
    """Walk back through pass-through ops to the node that really produced the values."""
    while is_pass_through(gm, node):
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if first is None:
            break
        node = first
    return node


def owner_name(node: fx.Node) -> str:
    """The qualified name of the innermost module whose forward created ``node`` ('' for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


# ------------------------------------------------------------------------------------ helpers
def set_submodule(root: nn.Module, name: str, module: Optional[nn.Module]) -> None:
    """Put ``module`` at dotted ``name`` under ``root`` (None removes it)."""
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if module is None:
        delattr(owner, attr)
    else:
        setattr(owner, attr, module)


def input_quantizer_of(gm: nn.Module, node: Any) -> Optional[Pow2FakeQuantize]:
    """The activation quantizer (a Pow2FakeQuantize) whose output ``node`` reads, looking through
    pass-through ops; None when the value is not quantized."""
    src = resolve_producer(gm, node) if isinstance(node, fx.Node) else None
    if src is None or src.op != "call_module":
        return None
    module = gm.get_submodule(str(src.target))
    return module if isinstance(module, Pow2FakeQuantize) else None


def leaf_conv_inputs(gm: nn.Module, node: fx.Node) -> list[tuple[str, QATConv, Any]]:
    """For a leaf module node (a detection head): (name, QATConv, input value) per quantized conv.

    The convention prepare, the export and quant.integer_ref share: a leaf called with a list of N
    tensors that holds N convs (QATConv, or Conv2d a rule kept float) applies its i-th conv (module
    order) to the i-th tensor. Any other call raises ValueError naming the leaf.
    """
    leaf = gm.get_submodule(str(node.target))
    slots, inside = [], ()
    for name, module in leaf.named_modules():
        if inside and name.startswith(inside):
            continue  # the float conv a QATConv wraps
        if isinstance(module, QATConv):
            slots.append((f"{node.target}.{name}", module))
            inside = f"{name}."
        elif isinstance(module, nn.Conv2d):
            slots.append((f"{node.target}.{name}", None))
    args = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else node.args
    if len(args) != len(slots):
        raise ValueError(f"{node.target}: leaf with {len(slots)} convs called with {len(args)} inputs")
    return [(name, conv, arg) for (name, conv), arg in zip(slots, args) if conv is not None]


# ------------------------------------------------------------------------------------ chains
@dataclass(frozen=True)
class Chain:
    """A Conv2d call with the BatchNorm2d and activation that follow it.

    ``conv``/``bn`` are module names; ``act`` is the activation's module name (or node name for a
    functional activation); ``act_kind`` is 'relu', 'relu6', 'other' (e.g. SiLU: reported, never
    fused) or None.  ``nodes`` are the fx node names that fuse into one module, in order.
    """

    conv: str
    bn: Optional[str]
    act: Optional[str]
    act_kind: Optional[str]
    nodes: tuple[str, ...]

    @property
    def fused_act(self) -> Optional[str]:
        """The activation kind folded into the fused module ('relu'/'relu6') or None."""
        return self.act_kind if self.act_kind in ("relu", "relu6") else None

    def describe(self) -> str:
        parts = ["conv"] + (["bn"] if self.bn else []) + ([self.act_kind] if self.fused_act else [])
        return "+".join(parts)


def _single_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def find_conv_bn_act(gm: fx.GraphModule) -> list[Chain]:
    """One :class:`Chain` per traced ``nn.Conv2d`` call (in graph order).

    The BN joins when it is the conv's only user and is called once; the activation joins when it
    is the only user of the BN (or of the conv when there is no BN).  A conv module called more than
    once (shared weights) is skipped: it cannot become one fused module per call.
    """
    counts = _call_counts(gm)
    chains = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if not isinstance(mod, nn.Conv2d) or counts[node.target] != 1:
            continue
        nodes, bn, last = [node.name], None, node
        user = _single_user(node)
        if user is not None and isinstance(_module(gm, user), nn.BatchNorm2d) and counts[user.target] == 1:
            bn, last = str(user.target), user
            nodes.append(user.name)
        act, kind = None, None
        user = _single_user(last)
        if user is not None:
            kind = activation_kind(gm, user)
            if kind is not None:
                act = str(user.target) if user.op == "call_module" else user.name
                if kind in ("relu", "relu6"):
                    nodes.append(user.name)
        chains.append(Chain(str(node.target), bn, act, kind, tuple(nodes)))
    return chains


# ------------------------------------------------------------------------------------ groups
@dataclass(frozen=True)
class Group:
    """An op whose inputs must share one quantizer: a concat (output shares it too) or an add.

    ``inputs`` are the producers of the inputs (found through pass-through ops, duplicates
    removed); ``output`` is the op's node; ``share_id`` numbers the merged set of tensors that use
    one quantizer (groups touching a common tensor get the same id).
    """

    kind: str
    inputs: tuple[str, ...]
    output: str
    share_id: int = -1


def group_of(gm: nn.Module, node: fx.Node) -> Optional[Group]:
    """The Group of a concat or tensor-add node (share_id -1), else None."""
    if is_concat(node):
        kind, raw = "concat", concat_inputs(node)
    elif is_add(node):
        kind, raw = "add", list(node.args[:2])
    else:
        return None
    names = []
    for arg in raw:
        name = resolve_producer(gm, arg).name
        if name not in names:
            names.append(name)
    return Group(kind, tuple(names), node.name)


def merge_groups(groups: Sequence[Group], order: Optional[Sequence[str]] = None) -> dict[str, int]:
    """Union-find over tensors: {tensor node name: set id}.  Concat ties inputs and output, add ties
    its inputs only.  Ids are numbered by first appearance in ``order`` (default: group order)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g in groups:
        members = list(g.inputs) + ([g.output] if g.kind == "concat" else [])
        for m in members[1:]:
            parent[find(m)] = find(members[0])
        find(members[0])
    names = list(order) if order is not None else [n for g in groups for n in (*g.inputs, g.output)]
    ids: dict[str, int] = {}
    out: dict[str, int] = {}
    for name in names:
        if name in parent:
            out[name] = ids.setdefault(find(name), len(ids))
    return out


def find_alignment_groups(gm: fx.GraphModule) -> list[Group]:
    """One :class:`Group` per ``torch.cat`` and tensor add, in graph order, with merged share ids."""
    groups = [g for g in (group_of(gm, n) for n in gm.graph.nodes) if g is not None]
    ids = merge_groups(groups, order=[n.name for n in gm.graph.nodes])
    return [Group(g.kind, g.inputs, g.output, ids[g.inputs[0]]) for g in groups]


def link_input_quantizers(gm: fx.GraphModule) -> None:
    """Tell every quantized conv which quantizer feeds it, so its bias can sit on the int32 grid
    s_in * s_w as in the integer model. A leaf module (detection head) called with N tensors applies
    its i-th QATConv to the i-th tensor (the convention quant.integer_ref and the export share)."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, QATConvBnAct):
            module.link_input_quantizer(input_quantizer_of(gm, node.args[0]))
        elif not isinstance(module, QATConv) and any(isinstance(m, QATConv) for m in module.modules()):
            for _, conv, arg in leaf_conv_inputs(gm, node):
                conv.link_input_quantizer(input_quantizer_of(gm, arg))
