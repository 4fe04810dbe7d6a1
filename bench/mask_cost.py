"""What a gradient mask costs on this CPU: one elementwise pass over an activation-sized tensor with the
mask as bool or as float, eager and (``--compiled``) in inductor's generated kernels.

Usage:
    python -m bench.mask_cost                 # eager ops
    python -m bench.mask_cost --compiled      # plus compiled kernels that write the mask

Why it matters: the CPU fake-quant saves its straight-through mask for the backward, and autograd saves
one per ReLU; notes/qat_speed.md has the table and what changed because of it.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch

from bench.qat_speed import Variant, interleave


def timed(rows: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each callable, timed in interleaved rounds (bench.qat_speed.interleave)."""
    variants = [Variant(name, name, fn) for name, fn in rows.items()]
    for v in variants:
        for _ in range(warmup):
            v.step()
    interleave(variants, runs, 1)
    return {v.name: v.median_ms for v in variants}


def eager_rows(shape: tuple[int, ...], runs: int) -> dict[str, float]:
    """ms of each eager pass; ``m`` a random bool mask, ``mostly`` one that is 99.9 % true."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    m = x <= 0
    mostly = torch.rand(shape, generator=gen) < 0.999
    keep = m.float()
    out = torch.empty_like(x)
    rows = {
        "x * 2": lambda: x * 2,
        "x <= 0 (writes bool)": lambda: x <= 0,
        "torch.eq(x, x, out=float tensor)": lambda: torch.eq(x, x, out=out),
        "torch.where(m, 0, x), m random": lambda: torch.where(m, 0.0, x),
        "x.masked_fill(m, 0), m random": lambda: x.masked_fill(m, 0),
        "x * m (bool promoted), m random": lambda: x * m,
        "torch.where(mostly, x, 0), 99.9 % true": lambda: torch.where(mostly, x, 0.0),
        "x * keep (float 1/0)": lambda: x * keep,
    }
    return timed(rows, runs)


def compiled_rows(shape: tuple[int, ...], runs: int) -> dict[str, float]:
    """ms of one compiled kernel computing relu(x) * 2 and writing the mask x <= 0 in three dtypes."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    kernels = {
        "compiled relu(x) * 2": lambda t: torch.relu(t) * 2,
        "  + mask as bool": lambda t: (torch.relu(t) * 2, t <= 0),
        "  + mask as uint8": lambda t: (torch.relu(t) * 2, (t <= 0).to(torch.uint8)),
        "  + mask as float": lambda t: (torch.relu(t) * 2, (t <= 0).float()),
    }
    with torch.no_grad():
        return timed({name: (lambda c: lambda: c(x))(torch.compile(fn)) for name, fn in kernels.items()}, runs)


class _FloatMaskReLU(torch.autograd.Function):
    """ReLU whose backward multiplies by a saved float 1/0 mask (what the CPU fake-quant does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.gt(x, 0, out=torch.empty_like(x)))
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (kept,) = ctx.saved_tensors
        return grad * kept


def training_rows(shape: tuple[int, ...], runs: int) -> dict[str, float]:
    """ms of a forward and backward of relu(x) * 2: eager, compiled, and compiled with the float-mask
    function above (whose saved mask inductor still stores as bool); then of a ReLU-folded fake-quant
    times 2: the eager kernel, compiled as traced float ops, and compiled calling the pow2q library op
    (what Pow2FakeQuantize runs under torch.compile on the CPU)."""
    from quant.fq_ops import PerTensorFakeQuantCPU, ReluRangeMaskFakeQuantCPU, compiled_fake_quant

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scale = torch.tensor([2.0 ** -5])
    steps = {
        "training step relu(x) * 2, eager": lambda t: torch.relu(t) * 2,
        "  compiled": torch.compile(lambda t: torch.relu(t) * 2),
        "  compiled, float-mask autograd function": torch.compile(lambda t: _FloatMaskReLU.apply(t) * 2),
        "training step fake_quant(relu(x)) * 2, eager": lambda t: ReluRangeMaskFakeQuantCPU.apply(t, scale, 0, 255) * 2,
        "  compiled, traced float ops": torch.compile(lambda t: PerTensorFakeQuantCPU.apply(torch.relu(t), scale, 0, 255) * 2),
        "  compiled, pow2q library op": torch.compile(lambda t: compiled_fake_quant(t, scale, 0, 255, True) * 2),
    }
    return timed({name: (lambda fn=fn: fn(x).sum().backward()) for name, fn in steps.items()}, runs)


def run(shape: tuple[int, ...] = (8, 32, 80, 80), runs: int = 50, compiled: bool = False) -> dict[str, float]:
    rows = eager_rows(shape, runs)
    if compiled:
        rows.update(compiled_rows(shape, runs))
        rows.update(training_rows(shape, runs))
    print(f"mask_cost: one pass over {tuple(shape)} float32 ({torch.get_num_threads()} threads), median of {runs}")
    for name, ms in rows.items():
        print(f"  {name:<44}{ms:8.3f} ms")
    return rows


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", type=int, default=[8, 32, 80, 80])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--compiled", action="store_true", help="also time inductor kernels that write the mask")
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    run(tuple(o.shape), o.runs, o.compiled)
