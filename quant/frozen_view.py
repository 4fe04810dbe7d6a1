"""The training forward: the prepared graph without re-quantizations that are identities once observers
are frozen, and with the ReLUs folded into the quantizers after them.

A concat whose inputs share one quantizer (:mod:`quant.prepare` ties them) joins tensors that are
already on that quantizer's grid, and the graph quantizes the result with the same quantizer again.
Once the observer is frozen that call maps every value to itself (each is ``k * scale`` with k inside
the integer range) and its straight-through gradient mask is all ones, so skipping it changes no bit of
the forward or the backward.  It is about a fifth of the activation values a YOLOv5 step quantizes.
While the observer runs, the full graph would also count the joined tensor into the statistics: a
second copy of values the quantizer has just counted, rounded to its grid. The view leaves that copy
out, so a shared set's statistics are those of its members; on coco128 that changed no exponent in
PTQ calibration or in QAT with every step observed (notes/qat_speed.md, tenth round).

A fused conv ending in ReLU whose output only feeds an unsigned per-tensor quantizer runs without its
ReLU, and the quantizer applies it (:meth:`Pow2FakeQuantize.fake_quant_after_relu`: its clamp at 0 is the
ReLU and one mask serves both): the same values and gradients, without the ReLU's pass forward and
backward. With the observer running that call observes relu(x) (a histogram observer counts it from x
itself), so it is right in any phase.

:func:`frozen_view` returns a module that shares every submodule (parameters, buffers, quantizers)
with the prepared model and runs the graph without those calls. Exporting, the integer reference,
checkpoints and EMA keep using the prepared model, whose graph is unchanged.

Example:
    >>> set_observers(prepared, False)
    >>> view = frozen_view(prepared)
    >>> loss = compute_loss(view(images), targets)   # same values and gradients as prepared(images)
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from quant.fake_quant import Pow2FakeQuantize
from quant.fused import QATConvBnAct
from quant.graph import concat_inputs, is_concat, resolve_producer
from quant.schedule import begin_observation_step

__all__ = ["frozen_view", "redundant_requantizations", "relu_quantizer_pairs"]


def _quantizer_target(gm: nn.Module, node: fx.Node) -> str:
    """The module name of the Pow2FakeQuantize ``node`` calls ('' when it calls something else)."""
    if node.op != "call_module":
        return ""
    return str(node.target) if isinstance(gm.get_submodule(str(node.target)), Pow2FakeQuantize) else ""


def _on_grid(gm: nn.Module, node: fx.Node, target: str) -> bool:
    """True when every value of ``node`` is an output of quantizer ``target``: that quantizer's own
    output (through max-pool, nearest upsample, reshapes), or a concat of such tensors."""
    src = resolve_producer(gm, node)
    if _quantizer_target(gm, src) == target:
        return True
    inputs = concat_inputs(src) if is_concat(src) else []
    return bool(inputs) and all(_on_grid(gm, x, target) for x in inputs)


def redundant_requantizations(gm: fx.GraphModule) -> list[fx.Node]:
    """Quantizer calls whose input is already on that quantizer's grid (identities with the observer
    frozen), in graph order."""
    found = []
    for node in gm.graph.nodes:
        target = _quantizer_target(gm, node)
        if target and node.args and isinstance(node.args[0], fx.Node) and is_concat(node.args[0]) \
                and _on_grid(gm, node.args[0], target):
            found.append(node)
    return found


def relu_quantizer_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(fused conv call, quantizer call) where a QATConvBnAct ending in ReLU feeds only an unsigned
    per-tensor quantizer: the ReLU can move into the quantizer's kernel."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        fused, user = gm.get_submodule(str(node.target)), next(iter(node.users))
        target = _quantizer_target(gm, user)
        if not (isinstance(fused, QATConvBnAct) and type(fused.act) is nn.ReLU and target and user.args == (node,)
                and not user.kwargs):
            continue
        quantizer = gm.get_submodule(target)
        if not quantizer.signed and not quantizer.spec.per_channel:
            pairs.append((node, user))
    return pairs


def _pre_activation(fused: QATConvBnAct, x: torch.Tensor) -> torch.Tensor:
    return fused.pre_activation(x)


def _fake_quant_after_relu(quantizer: Pow2FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    return quantizer.fake_quant_after_relu(x)


def _fold_relus(graph: fx.Graph, pairs: list[tuple[fx.Node, fx.Node]]) -> None:
    """Call each pair's conv without its ReLU and its quantizer with the ReLU folded in (same modules,
    reached through get_attr so the view's module tree and parameter names stay the prepared model's)."""
    for conv, quant in pairs:
        with graph.inserting_before(conv):
            pre = graph.call_function(_pre_activation, (graph.get_attr(str(conv.target)), *conv.args), dict(conv.kwargs))
        with graph.inserting_before(quant):
            folded = graph.call_function(_fake_quant_after_relu, (graph.get_attr(str(quant.target)), pre))
        quant.replace_all_uses_with(folded)
        graph.erase_node(quant)
        graph.erase_node(conv)


def frozen_view(prepared: fx.GraphModule) -> fx.GraphModule:
    """A module running ``prepared``'s graph without :func:`redundant_requantizations` and with the ReLUs
    folded, sharing every submodule with it (so training it trains ``prepared``). Equal to ``prepared``
    forward and backward while no observer runs; while observers run it leaves the joined tensors out of
    their statistics (the module docstring says why that is what they should count)."""
    graph = copy.deepcopy(prepared.graph)
    copy_of = dict(zip(prepared.graph.nodes, graph.nodes))
    pairs = [(copy_of[conv], copy_of[quant]) for conv, quant in relu_quantizer_pairs(prepared)]
    for node in [copy_of[n] for n in redundant_requantizations(prepared)]:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    _fold_relus(graph, pairs)
    graph.lint()
    view = fx.GraphModule(prepared, graph, class_name=f"{type(prepared).__name__}FrozenView")
    view.train(prepared.training)
    # each call is an observation step, as each call of prepared is: without it a quantizer would merge
    # this step's range into the last step's (Pow2FakeQuantize.begin_step)
    view.register_forward_pre_hook(begin_observation_step)
    return view
