"""A printable table of every quantizer: where it sits, its type, its power-of-2 scale and how much
of the observed data it clips."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from quant.schedule import iter_quantizers

HEADER = f"{'quantizer':<44} {'dtype':>6} {'bits':>4} {'scale':>13} {'observed range':>22} {'clipped':>8}"


def dtype_name(q) -> str:
    """'int8', 'uint8', ... of a quantizer."""
    return f"{'int' if q.signed else 'uint'}{q.bits}"


def pow2_text(exponents: torch.Tensor) -> str:
    """'2^-5' for one (rounded) exponent, '2^-9..2^-3' for per-channel ones."""
    k = exponents.detach().flatten().round().to(torch.int64)
    lo, hi = int(k.min()), int(k.max())
    return f"2^{lo}" if lo == hi else f"2^{lo}..2^{hi}"


def scale_text(q) -> str:
    return pow2_text(torch.log2(q.scale().detach().float()))


def observed_range(q) -> tuple[float, float]:
    """(smallest min, largest max) the observer saw; (nan, nan) before any observation."""
    lo, hi = q.min_val.detach().float(), q.max_val.detach().float()
    if lo.numel() == 0 or not torch.isfinite(lo).all() or not torch.isfinite(hi).all():
        return math.nan, math.nan
    return float(lo.min()), float(hi.max())


def range_text(lo: float, hi: float) -> str:
    """'[-1.5, 3.2]', or '-' for an unobserved range."""
    return "-" if math.isnan(lo) or math.isnan(hi) else f"[{lo:.3g}, {hi:.3g}]"


@torch.no_grad()
def clipping_ratios(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Fraction of each quantizer's input that falls outside its range, measured on `images`
    (float in [0,1]) in eval mode; observers are not touched."""
    ratios: dict[str, list[float]] = {}
    handles = []
    for name, q in iter_quantizers(model):
        def hook(module, args, _out, name=name):
            ratios.setdefault(name, []).append(float(module.clipping_ratio(args[0])))
        handles.append(q.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: sum(v) / len(v) for k, v in ratios.items()}


def quantizer_table(model: nn.Module, images: Optional[torch.Tensor] = None) -> str:
    """One row per distinct quantizer (shared ones once): name, dtype, bits, scale as 2^k, observed
    range, and the clipping ratio on `images` when given."""
    clipped = clipping_ratios(model, images) if images is not None else {}
    rows = [HEADER]
    for name, q in iter_quantizers(model):
        clip = f"{100 * clipped[name]:.2f}%" if name in clipped else "-"
        seen = range_text(*observed_range(q))
        rows.append(f"{name:<44} {dtype_name(q):>6} {q.bits:>4} {scale_text(q):>13} {seen:>22} {clip:>8}")
    return "\n".join(rows)
