"""The fake-quant arithmetic behind Pow2FakeQuantize, as plain functions of tensors: the per-tensor CPU
kernel and the trained-threshold (TQT) fake quantizer whose log2 threshold receives a gradient."""
from __future__ import annotations

import torch

EXP_MIN, EXP_MAX = -48, 48  # exponent bounds: 2**-48 .. 2**48 stay normal float32 powers of two


class PerTensorFakeQuantCPU(torch.autograd.Function):
    """torch.fake_quantize_per_tensor_affine (zero point 0) from vectorised elementwise ops: the same
    values, NaN mapping and straight-through mask, about twice as fast as the builtin CPU kernel,
    which quantizes one element at a time. CUDA keeps the builtin fused kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.round(x * scale.reciprocal())  # exact: the scale is a power of two
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return q.nan_to_num_(nan=qmin).clamp_(qmin, qmax).mul_(scale)  # NaN -> qmin, as the builtin

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """round(t) forward, identity backward (straight-through)."""
    return t + (torch.round(t) - t).detach()


def threshold_fake_quant(x: torch.Tensor, log2_threshold: torch.Tensor, shape: tuple, bits: int, signed: bool,
                         qmin: int, qmax: int) -> torch.Tensor:
    """Fake-quantize x with scale ``2**round(t) / 2**(bits - signed)`` for the trainable log2 threshold t
    (reshaped to ``shape`` to broadcast over x), differentiable in x and in t.

    The scale is an exact power of two at every step. Gradients (TQT, Jain et al. 2020): x gets the
    straight-through mask (1 inside the range, 0 where clipped); t gets, per element, ``s ln2 *
    (round(x/s) - x/s)`` inside the range and ``s ln2 * qmin|qmax`` where clipped, the derivative of the
    quantization error with respect to log2 t with the exponent's rounding passed straight through.
    """
    k = _round_ste(log2_threshold.float()).clamp(EXP_MIN, EXP_MAX)
    scale = torch.exp2(k - (bits - int(signed))).reshape(shape)
    xf = x.float()
    q = torch.clamp(_round_ste(xf / scale), qmin, qmax)
    out = q * scale
    return out if out.dtype == x.dtype else out.to(x.dtype)
