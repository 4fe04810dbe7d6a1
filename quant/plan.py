"""The plan of a prepared model: one row per quantized conv, add/concat, input, pass-through and float
op or module, saying what each is quantized to or why it stays float (``prepared.plan.table()``)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from quant.config import QuantConfig, QuantSpec

__all__ = ["PlanEntry", "QuantPlan", "check_rules_match", "float_module_entries"]


@dataclass
class PlanEntry:
    """One row of the plan: a fused conv, a head conv, an add/concat, the input, or a float op."""

    name: str
    kind: str  # 'input' | 'conv' | 'head_conv' | 'add' | 'concat' | 'pass' | 'float_op'
    layer: Optional[int] = None
    chain: str = ""
    weight: Optional[QuantSpec] = None
    activation: Optional[QuantSpec] = None
    signed: Optional[bool] = None  # of the output quantizer
    quantizer: str = ""  # module name of the output quantizer ('' when the output stays float)
    group: Optional[int] = None  # id of the set of tensors sharing that quantizer (None: not shared)
    float_reason: str = ""


def _spec_text(spec: Optional[QuantSpec], signed: Optional[bool]) -> str:
    if spec is None:
        return "float"
    text = f"{'int' if signed is not False else 'uint'}{spec.bits}{'/ch' if spec.per_channel else ''}"
    return text + (f" 2^{spec.fixed_exponent}" if spec.fixed_exponent is not None else f" {spec.rounding}")


class QuantPlan(list):
    """The list of :class:`PlanEntry` rows, in graph order, with a printable :meth:`table`."""

    HEADER = ("layer", "name", "kind", "fused", "weight", "output", "quantizer", "group", "note")

    def cells(self) -> list[tuple[str, ...]]:
        """Each entry as the texts of :attr:`HEADER`: layer, name, kind, fused chain, weight/output
        dtypes, quantizer, group, and why it is float (or shared)."""
        rows = []
        for e in self:
            weight = _spec_text(e.weight, e.weight.signed if e.weight else None) if e.weight else "-"
            out = _spec_text(e.activation, e.signed) if e.quantizer else "float"
            rows.append(("-" if e.layer is None else str(e.layer), e.name, e.kind, e.chain or "-", weight, out,
                         e.quantizer or "-", "-" if e.group is None else str(e.group), e.float_reason))
        return rows

    def table(self) -> str:
        """One line per entry (the texts of :meth:`cells`)."""
        widths = (5, -24, -9, -13, -16, -14, -28, 5, 0)

        def line(texts) -> str:
            parts = [t.rjust(w) if w > 0 else t.ljust(-w) for t, w in zip(texts, widths)]
            return (" ".join(parts[:1]) + "  " + " ".join(parts[1:8]) + "  " + parts[8]).rstrip()

        head = line(self.HEADER)
        return "\n".join([head, "-" * len(head)] + [line(row) for row in self.cells()])


def float_module_entries(model: nn.Module, plan: QuantPlan) -> list[PlanEntry]:
    """A row for every module with its own weights that the plan does not name and no quantizer covers
    (an nn.Linear, a Conv1d, a BN no conv precedes, ...): prepare quantizes Conv2d weights only, and a
    layer left float without a word would look quantized."""
    from quant.fake_quant import Pow2FakeQuantize
    from quant.fused import QATConv, QATConvBnAct

    named = {e.name for e in plan}
    covered: set[str] = set()
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (QATConvBnAct, QATConv, Pow2FakeQuantize)):
            covered.add(name)
            continue
        if any(name.startswith(c + ".") for c in covered if c) or name in named:
            continue
        if next(module.parameters(recurse=False), None) is None:
            continue
        kind = type(module).__name__
        why = "kept float (a plain Conv2d left outside every fused chain)" if type(module) is nn.Conv2d else \
            f"kept float ({kind}: prepare quantizes Conv2d weights only)"
        rows.append(PlanEntry(name, "float_module", float_reason=why))
    return rows


def check_rules_match(config: QuantConfig, model: nn.Module,
                      index_of: Callable[[str], Optional[int]] = lambda name: None) -> None:
    """Raise ValueError for the first rule of ``config`` that matches no module of ``model``, naming near
    matches: in a config a user wrote, such a rule is a typo until shown otherwise (a silently ignored
    'float' rule would leave them believing a layer is float). Not part of :func:`prepare`, which also
    rebuilds models from saved configs whose rules were written for another model."""
    names = [n for n, _ in model.named_modules() if n]
    unmatched = config.unmatched_rules(names, index_of)
    if unmatched:
        rule = unmatched[0]
        near = difflib.get_close_matches(rule.pattern, names, n=4, cutoff=0.6)
        layers = sorted({i for i in map(index_of, names) if i is not None})
        hint = (f"near matches: {', '.join(near)}" if near else
                f"layer indices here: {layers[0]}..{layers[-1]}" if rule.kind == "layer" and layers else
                "module names look like " + ", ".join(names[:3]))
        raise ValueError(f"quantization rule {rule.pattern!r} matches no layer of {type(model).__name__} ({hint})")
