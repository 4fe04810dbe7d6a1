"""Where accuracy goes: the signal-to-quantization-noise ratio (SQNR) of every quantizer's output.

For each distinct quantizer two figures, both in dB over the given images (higher is better):

- ``alone``: only this quantizer quantizes, on the float model's own tensors. For an activation
  quantizer that is ``x`` against ``q(x)``; for a weight quantizer, the output of its conv with the
  float weight against the quantized weight (the same float input).
- ``accumulated``: the whole model quantized, against the float model at the same point: the
  activation quantizer's output, or the weight quantizer's conv output. It includes the error of
  everything upstream, so a sharp fall from one row to the next marks a layer that hurts.

Plus the fraction of values clipped (activations: of the float model's tensors, the same ones the
SQNR alone reads), the chosen exponent(s) and scale, and the range the observer saw.

Example::

    rows = layer_errors(prepared, images)          # images: float in [0, 1]
    print(format_layer_errors(rows))
    write_layer_errors_csv(rows, "quant_layers.csv"); plot_layer_errors(rows, "quant_layers.png")
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from quant.fake_quant import Pow2FakeQuantize
from quant.fused import quantized_convs
from quant.report import dtype_name, observed_range, pow2_text, range_text, scale_text
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
    bits: int = 8
    signed: bool = True
    scale: str = ""  # '2^-12' or '2^-16..2^-10' (per channel)
    range_lo: float = math.nan  # what the integer grid can hold: quant_min * scale (widest channel)
    range_hi: float = math.nan  # quant_max * scale; nan before calibration
    observed_lo: float = math.nan  # the observer's min and max; nan before any observation
    observed_hi: float = math.nan


# The printed table's columns: (key of `cells`, header, width; negative: left-aligned). The HTML
# report shows these very cells, plus 'bits', 'sign' and 'range'.
COLUMNS = (("name", "quantizer", -44), ("kind", "kind", -10), ("dtype", "dtype", 6), ("exponent", "exponent", 12),
           ("scale", "scale", 13), ("observed", "observed range", 22), ("clipped", "clipped", 8),
           ("sqnr_alone", "SQNR alone", 11), ("sqnr_accumulated", "accum.", 9))


def cells(row: LayerError) -> dict[str, str]:
    """Every figure of a row as the reports print it."""
    return {"name": row.name, "kind": row.kind, "dtype": row.dtype, "bits": str(row.bits),
            "sign": "signed" if row.signed else "unsigned", "exponent": row.exponent, "scale": row.scale,
            "range": range_text(row.range_lo, row.range_hi),
            "observed": range_text(row.observed_lo, row.observed_hi), "clipped": f"{100 * row.clipped:.3f}%",
            "sqnr_alone": f"{row.sqnr_alone:.1f} dB", "sqnr_accumulated": f"{row.sqnr_accumulated:.1f} dB"}


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


def _grid_range(q: Pow2FakeQuantize) -> tuple[float, float]:
    if not int(q.calibrated):
        return math.nan, math.nan
    widest = float(q.scale().max())
    return q.quant_min * widest, q.quant_max * widest


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
        rows.append(LayerError(name, "weight" if name in convs else "activation", dtype_name(q),
                               pow2_text(q.exponent), sum(c * n for c, n in clip) / total if total else 0.0,
                               stats[name]["alone"].db(), stats[name]["accum"].db(), q.bits, q.signed,
                               scale_text(q), *_grid_range(q), *observed_range(q)))
    return rows


def format_layer_errors(rows: list[LayerError]) -> str:
    """A printable table, one line per quantizer (the cells of :func:`cells`)."""
    def line(texts) -> str:
        return " ".join(t.ljust(-w) if w < 0 else t.rjust(w) for t, (_, _, w) in zip(texts, COLUMNS)).rstrip()

    head = line([header for _, header, _ in COLUMNS])
    return "\n".join([head, "-" * len(head)] + [line([cells(r)[key] for key, _, _ in COLUMNS]) for r in rows])


def write_layer_errors_csv(rows: list[LayerError], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(LayerError)])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return path


def plot_layer_errors(rows: list[LayerError], path: str | Path) -> Path:
    """One PNG: SQNR alone and accumulated per quantizer as grouped horizontal bars, and beside them
    the fraction each one clips."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    finite = [v for r in rows for v in (r.sqnr_alone, r.sqnr_accumulated) if math.isfinite(v)]
    cap = max(finite or [1.0])  # an exact quantizer (infinite SQNR) gets the longest finite bar
    fig = Figure(figsize=(12, max(3.0, 0.16 * len(rows) + 1.0)))
    FigureCanvasAgg(fig)
    ax, clip_ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (3, 1)})
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [min(r.sqnr_alone, cap) for r in rows], 0.4, label="alone")
    ax.barh([y + 0.2 for y in ys], [min(r.sqnr_accumulated, cap) for r in rows], 0.4, label="accumulated")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r.name.replace("act_quant.", "") for r in rows], fontsize=6)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first quantizer on top, no empty margin
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.legend(loc="lower right")
    clip_ax.barh(list(ys), [100 * r.clipped for r in rows], 0.6, color="tab:red")
    clip_ax.set_xlabel("clipped (% of values)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


@torch.no_grad()
def float_activations(model: nn.Module, images: torch.Tensor, names: list[str],
                      max_values: int = 250_000) -> dict[str, torch.Tensor]:
    """The float model's values at the named quantizers (their inputs with fake quantization off: the
    tensors the 'clipped' column counts), flattened on the CPU; of a call with more than
    ``max_values`` values an evenly strided sample. The model's state is left as it was."""
    seen: dict[str, list[torch.Tensor]] = {}
    quantizers = dict(iter_quantizers(model))

    def keep(name: str, x: torch.Tensor) -> None:
        flat = x.detach().flatten()
        step = max(1, math.ceil(flat.numel() / max_values))
        seen.setdefault(name, []).append(flat[::step].float().cpu())

    handles = [quantizers[n].register_forward_hook(lambda _m, args, _out, n=n: keep(n, args[0])) for n in names]
    try:
        with flags_restored(model):
            set_fake_quant(model, False)
            model(images)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}
