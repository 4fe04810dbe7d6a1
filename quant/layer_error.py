"""Where accuracy goes: the signal-to-quantization-noise ratio (SQNR) of every quantizer's output.

For each distinct quantizer two figures, both in dB over the given images (higher is better):

- ``alone``: only this quantizer quantizes, on the float model's own tensors. For an activation
  quantizer that is ``x`` against ``q(x)``; for a weight quantizer, the output of its conv with the
  float weight against the quantized weight (the same float input).
- ``accumulated``: the whole model quantized, against the float model at the same point: the
  activation quantizer's output, or the weight quantizer's conv output. It includes the error of
  everything upstream, so a sharp fall from one row to the next marks a layer that hurts.

Plus the fraction of values clipped (activations) and the chosen exponent(s).

Example::

    rows = layer_errors(prepared, images)          # images: float in [0, 1]
    print(format_layer_errors(rows))
    write_layer_errors_csv(rows, "quant_layers.csv"); plot_layer_errors(rows, "quant_layers.png")
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from quant.fake_quant import Pow2FakeQuantize
from quant.fused import quantized_convs
from quant.schedule import flags_restored, iter_quantizers, set_fake_quant


@dataclass
class LayerError:
    """One quantizer's row of the report."""

    name: str
    kind: str  # 'weight' | 'activation'
    dtype: str  # 'int8', 'uint8', ...
    exponent: str  # '2^-5' or '2^-9..2^-3' (per channel)
    clipped: float  # fraction of values outside the range (activations; 0 for weights)
    sqnr_alone: float
    sqnr_accumulated: float


class _Energy:
    """Running sums of signal and noise energy (float64) for one SQNR."""

    def __init__(self) -> None:
        self.signal, self.noise = 0.0, 0.0

    def add(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        ref = reference.detach().double()
        self.signal += float(ref.pow(2).sum())
        self.noise += float((approx.detach().double() - ref).pow(2).sum())

    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-30) / self.noise)


def _exponent_text(q: Pow2FakeQuantize) -> str:
    k = q.exponent.detach().round().to(torch.int64)
    lo, hi = int(k.min()), int(k.max())
    return f"2^{lo}" if lo == hi else f"2^{lo}..2^{hi}"


def _weight_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(weight quantizer) -> (quantizer name, the conv module that owns it)."""
    return {id(module.weight_fake_quant): (f"{name}.weight_fake_quant" if name else "weight_fake_quant", module)
            for name, module in quantized_convs(model)}


def _conv_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return module.conv_only(x, weight.to(x.dtype)) + bias.to(x.dtype).reshape(1, -1, 1, 1)


@torch.no_grad()
def _record(model: nn.Module, images: torch.Tensor, activations: dict, convs: dict, hooks_for_float: bool,
            stats: Optional[dict] = None) -> dict:
    """One eval forward; returns {name: [tensor per call]}: the activation quantizers' outputs (their
    inputs in the float pass, where fake quantization is off) and the owned convs' pre-activation
    outputs with the weights the pass uses. In the float pass also fills the 'alone' statistics."""
    seen: dict[str, list] = {}
    handles = []
    for name, q in activations.items():
        def act_hook(mod, args, out, name=name):
            seen.setdefault(name, []).append(out.detach())
            if hooks_for_float:
                stats[name]["alone"].add(args[0], mod.quantize_now(args[0]))
                stats[name]["clip"].append((mod.clipping_ratio(args[0]), args[0].numel()))
        handles.append(q.register_forward_hook(act_hook))
    for name, (module, w_float, w_quant, bias) in convs.items():
        def conv_hook(mod, args, _out, name=name, w_float=w_float, w_quant=w_quant, bias=bias):
            x = args[0]
            if hooks_for_float:
                ref = _conv_output(mod, x, w_float, bias)
                stats[name]["alone"].add(ref, _conv_output(mod, x, w_quant, bias))
                seen.setdefault(name, []).append(ref)
            else:
                seen.setdefault(name, []).append(_conv_output(mod, x, w_quant, bias))
        handles.append(module.register_forward_hook(conv_hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def layer_errors(model: nn.Module, images: torch.Tensor) -> list[LayerError]:
    """The report's rows, in the model's quantizer order (see the module docstring). ``images`` are
    float in [0, 1]; the model's state (flags, observers, BN) is left as it was."""
    quantizers = dict(iter_quantizers(model))
    owners = _weight_owners(model)
    convs, activations = {}, {}
    for name, q in quantizers.items():
        if id(q) in owners:
            module = owners[id(q)][1]
            w_float, bias = module.folded_weight_and_bias()
            convs[name] = (module, w_float, w_float + module.weight_error(), bias)
        else:
            activations[name] = q
    stats = {name: {"alone": _Energy(), "accum": _Energy(), "clip": []} for name in quantizers}
    with flags_restored(model):
        quantized = _record(model, images, activations, convs, False)  # as the model is set up
        set_fake_quant(model, False)
        reference = _record(model, images, activations, convs, True, stats)
    rows = []
    for name, q in quantizers.items():
        for ref, approx in zip(reference.get(name, []), quantized.get(name, [])):
            stats[name]["accum"].add(ref, approx)
        clip = stats[name]["clip"]
        total = sum(n for _, n in clip)
        rows.append(LayerError(name, "weight" if name in convs else "activation",
                               f"{'int' if q.signed else 'uint'}{q.bits}", _exponent_text(q),
                               sum(c * n for c, n in clip) / total if total else 0.0,
                               stats[name]["alone"].db(), stats[name]["accum"].db()))
    return rows


def format_layer_errors(rows: list[LayerError]) -> str:
    """A printable table, one line per quantizer."""
    head = f"{'quantizer':<44} {'kind':<10} {'dtype':>6} {'exponent':>12} {'clipped':>8} {'SQNR alone':>11} {'accum.':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<44} {r.kind:<10} {r.dtype:>6} {r.exponent:>12} {100 * r.clipped:>7.3f}% "
                     f"{r.sqnr_alone:>8.1f} dB {r.sqnr_accumulated:>5.1f} dB")
    return "\n".join(lines)


def write_layer_errors_csv(rows: list[LayerError], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["name"])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return path


def plot_layer_errors(rows: list[LayerError], path: str | Path) -> Path:
    """One PNG: SQNR alone and accumulated per quantizer, as grouped horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    finite = [r for r in rows if math.isfinite(r.sqnr_alone) or math.isfinite(r.sqnr_accumulated)]
    cap = max([v for r in finite for v in (r.sqnr_alone, r.sqnr_accumulated) if math.isfinite(v)] or [1.0])
    height = max(3.0, 0.16 * len(rows) + 1.0)
    fig, ax = plt.subplots(figsize=(9, height))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [min(r.sqnr_alone, cap) for r in rows], 0.4, label="alone")
    ax.barh([y + 0.2 for y in ys], [min(r.sqnr_accumulated, cap) for r in rows], 0.4, label="accumulated")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r.name.replace("act_quant.", "") for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
