"""Which layers cost the most when quantized, and a mixed-precision config that keeps those wider.

:func:`rank_layers` quantizes one weighted layer at a time (its weights and its output quantizer;
everything else float) and measures the SQNR of the model's output against the float model on a
few images: the lower, the more sensitive. :func:`fewest_wide_layers` then finds the smallest N such
that keeping the N most sensitive layers at 16 bits meets a target, by bisection over N with a
caller-supplied evaluation (e.g. mAP after PTQ), assuming more wide layers never hurt.
:func:`mixed_precision_config` writes those N layers as rules on top of a config.

Example::

    ranking = rank_layers(prepared, images)               # [(name, dB), ...] most sensitive first
    n, metric = fewest_wide_layers([n for n, _ in ranking], score, target=float_map - 0.005)
    mixed_precision_config(config, [n for n, _ in ranking[:n]]).to_yaml("mixed.yaml")
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from quant.config import LayerRule, QuantConfig
from quant.schedule import flags_restored, set_fake_quant

WIDE_BITS = 16


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


def output_sqnr(reference: Any, approx: Any) -> float:
    """SQNR in dB of every tensor in ``approx`` against the same tensor in ``reference``."""
    signal = noise = 0.0
    for ref, app in zip(_tensors(reference), _tensors(approx)):
        signal += float(ref.double().pow(2).sum())
        noise += float((app.double() - ref.double()).pow(2).sum())
    return math.inf if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-30) / noise)


def weighted_layers(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(plan name, [weight quantizer, output quantizer]) for every quantized conv of a prepared model."""
    modules = dict(model.named_modules())
    units = []
    for entry in getattr(model, "plan", []):
        if entry.weight is None:
            continue
        owner = next((modules[n] for n in (entry.name, f"{entry.name}.conv") if n in modules
                      and hasattr(modules[n], "weight_fake_quant")), None)
        if owner is None:
            continue
        quantizers = [owner.weight_fake_quant]
        if entry.quantizer and entry.quantizer in modules:
            quantizers.append(modules[entry.quantizer])
        units.append((entry.name, quantizers))
    return units


@torch.no_grad()
def rank_layers(model: nn.Module, images: torch.Tensor,
                outputs: Callable[[Any], Any] = lambda out: out) -> list[tuple[str, float]]:
    """[(layer, output SQNR in dB with only that layer quantized)], most sensitive (lowest) first.
    ``outputs`` picks what to compare from the model's output (e.g. YOLO's raw head maps)."""
    scores = []
    with flags_restored(model):
        set_fake_quant(model, False)
        reference = outputs(model(images))
        for name, quantizers in weighted_layers(model):
            for q in quantizers:
                q.enable_fake_quant(True)
            scores.append((name, output_sqnr(reference, outputs(model(images)))))
            for q in quantizers:
                q.enable_fake_quant(False)
    return sorted(scores, key=lambda item: item[1])


def fewest_wide_layers(ranked: Sequence[str], evaluate: Callable[[list[str]], float], target: float,
                       log: Optional[Callable[[int, float], None]] = None) -> tuple[int, float]:
    """Smallest N for which ``evaluate(ranked[:N]) >= target`` (bisection; each N evaluated once).
    Returns (N, its score); when even every layer wide misses the target, (len(ranked), score)."""
    cache: dict[int, float] = {}

    def score(n: int) -> float:
        if n not in cache:
            cache[n] = evaluate(list(ranked[:n]))
            if log is not None:
                log(n, cache[n])
        return cache[n]

    if score(0) >= target:
        return 0, cache[0]
    lo, hi = 0, len(ranked)  # score(lo) misses; hi is the candidate
    if score(hi) < target:
        return hi, cache[hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if score(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, cache[hi]


def mixed_precision_config(config: QuantConfig, wide: Iterable[str], bits: int = WIDE_BITS) -> QuantConfig:
    """``config`` plus one rule per name in ``wide`` giving its weights and output ``bits`` bits
    (exact-name rules take precedence over the config's own glob and layer rules)."""
    own = {rule.pattern for rule in config.rules}
    extra = tuple(LayerRule(name, weight={"bits": bits}, activation={"bits": bits}) for name in wide
                  if name not in own)
    return QuantConfig.from_dict({**config.to_dict(), "rules": [r.to_dict() for r in config.rules + extra]})
