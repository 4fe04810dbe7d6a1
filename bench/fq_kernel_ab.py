"""The eager CPU fake-quant kernels side by side in one process: the builtin per-channel kernel and the
float-mask per-tensor one (quant.fq_ops.PerTensorFakeQuantCPU, which torch.compile traces) against the
range-mask kernels eager training runs (ChannelRangeMaskFakeQuantCPU, RangeMaskFakeQuantCPU), in every
QAT phase, with the float step as the yardstick; in the phases that run quant.frozen_view each kernel set
runs with the fused convs' ReLU left in the conv, and the default also with it folded into the quantizer.

Usage:
    python -m bench.fq_kernel_ab --rounds 6

Same model, batch and trainer step as bench.qat_speed (yolov5n ReLU, 320 px, batch 8); each QAT phase
runs once per kernel, all variants in interleaved rounds.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import _train_variants, interleave  # noqa: E402

DEFAULT = "range-mask both"
VIEW_PHASES = ("qat_frozen_observers", "qat_frozen")  # run quant.frozen_view, where a ReLU can fold


class _BuiltinPerChannel:
    """The builtin per-channel kernel behind ChannelRangeMaskFakeQuantCPU's call signature (the weights'
    channels are on axis 0)."""

    @staticmethod
    def apply(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        zero = torch.zeros(scale.numel(), dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero, 0, qmin, qmax)


def kernel_sets() -> dict[str, tuple]:
    """name -> (per-channel kernel, per-tensor kernel) for Pow2FakeQuantize's eager CPU path."""
    from quant.fq_ops import ChannelRangeMaskFakeQuantCPU, PerTensorFakeQuantCPU, RangeMaskFakeQuantCPU

    return {"builtin per-channel, float-mask per-tensor (before)": (_BuiltinPerChannel, PerTensorFakeQuantCPU),
            "builtin per-channel, range-mask per-tensor": (_BuiltinPerChannel, RangeMaskFakeQuantCPU),
            DEFAULT: (ChannelRangeMaskFakeQuantCPU, RangeMaskFakeQuantCPU)}


def _using(kernels: tuple):
    """A setup step that makes Pow2FakeQuantize's eager CPU path run ``kernels``."""
    import quant.fake_quant as fake_quant

    def use() -> None:
        fake_quant.ChannelRangeMaskFakeQuantCPU, fake_quant.RangeMaskFakeQuantCPU = kernels
    return use


def _with(variant, kernels: tuple, label: str):
    """``variant`` (a fresh copy) running ``kernels``."""
    setup = (lambda phase, use: lambda: (phase(), use()))(variant.setup, _using(kernels))
    return replace(variant, name=label, label=label, setup=setup, times=[])


def _unfolded(opt: dict) -> list:
    """bench.qat_speed's eager variants on a model whose frozen view leaves each fused conv's ReLU in the conv."""
    import quant.frozen_view as fv

    fold = fv._fold_relus
    fv._fold_relus = lambda graph, pairs: None
    try:
        return _train_variants(opt, torch.device("cpu"))[0]
    finally:
        fv._fold_relus = fold


def run(rounds: int = 6, steps: int = 2, imgsz: int = 320, batch_size: int = 8, seed: int = 0,
        cfg: str = "yolov5n.yaml") -> dict[str, float]:
    from bench.train_speed import DEFAULT_HYP
    from utils.torch_utils import keep_freed_memory

    keep_freed_memory(torch.device("cpu"))
    opt = dict(cfg=cfg, act="relu", imgsz=imgsz, batch_size=batch_size, warmup=3, compile=False,
               hyp=DEFAULT_HYP, qat_config=None, seed=seed)
    folded, _ = _train_variants(opt, torch.device("cpu"))
    unfolded = _unfolded(opt)
    sets = kernel_sets()
    variants = [folded[0]]
    for v, u in zip(folded[1:], unfolded[1:]):
        view = v.name in VIEW_PHASES
        variants += [_with(u, kernels, f"{u.label}; {name}" + ("; ReLU in the conv" if view else ""))
                     for name, kernels in sets.items()]
        if view:
            variants.append(_with(v, sets[DEFAULT], f"{v.label}; {DEFAULT}; ReLU folded into the quantizer (default)"))
    try:
        interleave(variants, rounds, steps)
    finally:
        _using(sets[DEFAULT])()
    base = variants[0].median_ms
    print(f"{'training step; kernels':120s} {'ms':>8s} {'x float':>8s}")
    for v in variants:
        print(f"{v.label:120s} {v.median_ms:8.1f} {v.median_ms / base:8.2f}")
    return {v.name: v.median_ms for v in variants}


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=8)
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    run(o.rounds, o.steps, o.imgsz, o.batch_size)
