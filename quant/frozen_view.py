"""The training forward once observers are frozen: the prepared graph without re-quantizations that
are identities then.

A concat whose inputs share one quantizer (:mod:`quant.prepare` ties them) joins tensors that are
already on that quantizer's grid, and the graph quantizes the result with the same quantizer again.
While the observer runs, that call counts the joined tensor into the statistics, so it must stay;
once the observer is frozen it maps every value to itself (each is ``k * scale`` with k inside the
integer range) and its straight-through gradient mask is all ones, so skipping it changes no bit of
the forward or the backward.  It is about a fifth of the activation values a YOLOv5 step quantizes.

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

import torch.fx as fx
from torch import nn

from quant.fake_quant import Pow2FakeQuantize
from quant.graph import concat_inputs, is_concat, resolve_producer

__all__ = ["frozen_view", "redundant_requantizations"]


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


def frozen_view(prepared: fx.GraphModule) -> fx.GraphModule:
    """A module running ``prepared``'s graph without :func:`redundant_requantizations`, sharing every
    submodule with it (so training it trains ``prepared``). Equal to ``prepared`` forward and backward
    while no observer runs; with observers on it would leave the joined tensors out of their statistics."""
    graph = copy.deepcopy(prepared.graph)
    skip = set(redundant_requantizations(prepared))
    copies = [copied for original, copied in zip(prepared.graph.nodes, graph.nodes) if original in skip]
    for node in copies:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    graph.lint()
    view = fx.GraphModule(prepared, graph, class_name=f"{type(prepared).__name__}FrozenView")
    view.train(prepared.training)
    return view
