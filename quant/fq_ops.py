"""The arithmetic behind Pow2FakeQuantize, as plain functions of tensors: power-of-2 scales and exponents,
the CPU kernels (range-mask per-tensor, per-channel and ReLU-folded ones, as autograd Functions for eager
training and as torch.library ops for torch.compile; the float-mask one they replaced), the
trained-threshold (TQT) fake quantizer whose log2 threshold receives a gradient, the 'mse' rule's
candidate errors, and which half-precision fake-quant kernels a device has."""
from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch

EXP_MIN, EXP_MAX = -48, 48  # exponent bounds: 2**-48 .. 2**48 stay normal float32 powers of two
MSE_CANDIDATES = 5  # 'mse' tries k in [ceil(log2 m) - 4, ceil(log2 m)]
# Bounds keep k finite for all-zero channels (log2 0 = -inf) and overflowing data; 2**-48 / 2**15
# is still a normal float32, so every scale stays an exact power of two.
_MIN_BOUND = 2.0 ** -32


def exponent_from_bound(bound: torch.Tensor, rounding: str) -> torch.Tensor:
    """Integer exponent k (as float32) for observed bounds ``bound`` by the 'ceil' or 'round' rule.

    For 'mse' this returns ``ceil(log2 bound)``, the top of the candidate window.
    """
    log2 = torch.log2(bound.double().clamp_min(_MIN_BOUND))  # double: exact at powers of two
    k = torch.round(log2) if rounding == "round" else torch.ceil(log2)
    return k.clamp(EXP_MIN, EXP_MAX).float()


def ceil_exponent(bound: float) -> int:
    """``exponent_from_bound(torch.tensor([bound]), "ceil")`` for one finite Python float, computed on the host:
    frexp splits the bound exactly (bound = m * 2**e, 0.5 <= m < 1), so ceil(log2 bound) is e, or e - 1 when m
    is 0.5 (a power of two). The same value: a float32 bound that is not a power of two lies at least
    2**-24 (relative) from one, far beyond the float64 log2's error."""
    if math.isnan(bound):
        raise ValueError("ceil_exponent: the bound is NaN")
    if math.isinf(bound) and bound > 0:
        return EXP_MAX
    mantissa, exponent = math.frexp(max(bound, _MIN_BOUND))
    k = exponent - 1 if mantissa == 0.5 else exponent
    return min(max(k, EXP_MIN), EXP_MAX)


def pow2_scale(exponent: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """float32 scales ``2**exponent / 2**(bits - signed)``: float64 pow then cast, exact for integer
    exponents on every backend."""
    return torch.pow(2.0, exponent.double() - (bits - int(signed))).float()


def row_candidate_errors(rows: torch.Tensor, top: torch.Tensor, bits: int, signed: bool, qmin: int,
                         qmax: int) -> torch.Tensor:
    """(C, MSE_CANDIDATES) mean squared fake-quant error of each row of ``rows`` for k = top-4 .. top
    (the histogram observer has its own, over bins: quant.histogram.candidate_errors)."""
    errs = []
    for j in range(MSE_CANDIDATES):
        scale = pow2_scale(top - (MSE_CANDIDATES - 1 - j), bits, signed).to(rows.device)[:, None]
        q = torch.clamp(torch.round(rows / scale), qmin, qmax) * scale
        errs.append((q - rows).pow(2).mean(dim=1))
    return torch.stack(errs, dim=1)


def shift_errors(err: torch.Tensor, old_top: torch.Tensor, new_top: torch.Tensor, fill) -> torch.Tensor:
    """Re-index candidate errors from window ``old_top`` to ``new_top`` (per row).

    Candidates new to the window take ``fill`` (the current errors), or the nearest old column when
    ``fill`` is None.
    """
    n = err.shape[1]
    idx = torch.arange(n, device=err.device)[None, :] + (new_top - old_top).long()[:, None]
    gathered = err.gather(1, idx.clamp(0, n - 1))
    if fill is None:
        return gathered
    return torch.where((idx >= 0) & (idx < n), gathered, fill)


# device type -> the half dtypes whose builtin fake-quant kernels work there (probe_half_kernels).
_HALF_KERNELS: dict[str, frozenset] = {}


def probe_half_kernels(device: torch.device | str) -> frozenset:
    """Which of bf16/fp16 this torch build can fake-quantize natively on ``device``'s type, tried once on
    a tiny tensor and remembered for the process. Called when a model is prepared or moved, never inside
    a forward; a device never probed fake-quantizes half tensors through float32 (same values)."""
    kind = torch.device(device).type
    if kind not in _HALF_KERNELS:
        working = set()
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.zeros(2, 2, dtype=dtype, device=kind)
            one, zero = torch.ones(2, device=kind), torch.zeros(2, dtype=torch.int32, device=kind)
            try:
                torch.fake_quantize_per_tensor_affine(x, one[:1], zero[:1], 0, 255)
                torch.fake_quantize_per_channel_affine(x, one, zero, 0, 0, 255)
            except RuntimeError:
                continue
            working.add(dtype)
        _HALF_KERNELS[kind] = frozenset(working)
    return _HALF_KERNELS[kind]


def has_half_kernel(x: torch.Tensor) -> bool:
    """Whether to fake-quantize the autocast (bf16/fp16) tensor ``x`` in its own dtype. The result is the
    same as going through float32: with a power-of-2 scale, x / s and q * s are exact, and every 8-bit
    grid value q * s (|q| <= 255) is representable in bf16 and fp16; it saves two casts (a full read
    and write of the activation each, forward and backward)."""
    return x.dtype in _HALF_KERNELS.get(x.device.type, ())


class PerTensorFakeQuantCPU(torch.autograd.Function):
    """torch.fake_quantize_per_tensor_affine (zero point 0) from vectorised elementwise ops: the same
    values, NaN mapping and straight-through gradient, about twice as fast as the builtin CPU kernel,
    which quantizes one element at a time. CUDA keeps the builtin fused kernel.

    Six passes forward (scale, round, clamp, compare, NaN, rescale) and one backward. A value was kept
    exactly when clamping left it unchanged (NaN != NaN counts as clipped, as in the builtin mask). The
    mask is stored as float 1/0 and the backward multiplies by it, as the builtin does: on the CPU,
    reading a bool tensor (mul, where, masked_fill) is not vectorised and costs 3-10 elementwise passes
    (notes/qat_speed.md). The CPU path's kernel before :class:`RangeMaskFakeQuantCPU`; torch.compile traces it
    where torch has no library ops (before 2.4), and bench.fq_kernel_ab times it as the baseline."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.mul(x, scale.reciprocal()).round_()  # exact: the scale is a power of two
        out = q.clamp(qmin, qmax)
        ctx.save_for_backward(torch.eq(out, q, out=torch.empty_like(q)))
        return out.nan_to_num_(nan=qmin).mul_(scale)  # NaN -> qmin, as the builtin

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return grad * kept, None, None, None


@lru_cache(maxsize=1024)
def kept_range(scale: float, qmin: int, qmax: int) -> tuple[float, float]:
    """The open interval (lo, hi) of float32 inputs x whose code round(x / scale) (half to even) lies in
    [qmin, qmax], as float32 values: a tie at qmin - 0.5 rounds into the range when qmin is even, a tie at
    qmax + 0.5 out of it when qmax is odd (the 8-bit ranges), so the bounds step one float32 past the tie
    where the tie is kept."""
    lo, hi = np.float32((qmin - 0.5) * scale), np.float32((qmax + 0.5) * scale)
    if qmin % 2 == 0:
        lo = np.nextafter(lo, np.float32(-np.inf))
    if qmax % 2 == 0:
        hi = np.nextafter(hi, np.float32(np.inf))
    return float(lo), float(hi)


class RangeMaskFakeQuantCPU(torch.autograd.Function):
    """The eager CPU fake-quant: :class:`PerTensorFakeQuantCPU`'s values from five in-place passes over one
    new tensor, and no mask kept. The backward reads the straight-through mask off the saved input with
    aten's hardtanh_backward (the gradient where lo < x < hi, :func:`kept_range`; 0 elsewhere), one
    vectorised pass. The input is mostly saved already (by the ReLU before it), so the mask's memory goes
    too; forward plus backward is about a third faster (notes/qat_speed.md).

    Equal to the builtin's gradient wherever the gradient is finite (a NaN input gets 0, as there); where
    the builtin multiplies a non-finite gradient by a zero mask this gives 0, not NaN. The bounds are read
    on the host, so under torch.compile it runs as the library op :func:`compiled_fake_quant`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        return _range_mask_forward(ctx, x, scale, qmin, qmax, kept_range(float(scale), qmin, qmax))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.kept), None, None, None


def _fake_quant_values(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """x fake-quantized in five in-place passes over one new tensor (NaN -> qmin, as the builtin)."""
    return torch.mul(x, scale.reciprocal()).round_().clamp_(qmin, qmax).nan_to_num_(nan=qmin).mul_(scale)


def _range_mask_forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                        kept: tuple[float, float]) -> torch.Tensor:
    ctx.kept = kept
    ctx.save_for_backward(x)
    return _fake_quant_values(x, scale, qmin, qmax)


class ReluRangeMaskFakeQuantCPU(RangeMaskFakeQuantCPU):
    """``RangeMaskFakeQuantCPU(relu(x))`` for an unsigned range (qmin 0) in one kernel: the clamp at 0 is the
    ReLU, and the mask keeps 0 < x < hi, the ReLU's mask and the quantizer's together. Same values (a
    negative input gives -0.0 where the ReLU gives 0.0) and the same gradient as the two in sequence,
    without the ReLU's own pass forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        if qmin != 0:
            raise ValueError(f"a ReLU folds into an unsigned quantizer only (qmin 0, got {qmin})")
        return _range_mask_forward(ctx, x, scale, qmin, qmax, (0.0, kept_range(float(scale), qmin, qmax)[1]))


class ChannelRangeMaskFakeQuantCPU(torch.autograd.Function):
    """Per-channel twin of :class:`RangeMaskFakeQuantCPU` for the weights: ``scale`` broadcasts over x (a
    power of two per channel). x is divided by its channel's scale first (exact), so one pair of unit-scale
    bounds serves every channel and the saved quotient gives the mask. The builtin per-channel CPU kernel
    quantizes one element at a time: about 8 ms of a yolov5n training step, whatever the image size.

    The builtin's values and gradient (finite gradients), NaN included; +inf maps to qmax here, where the
    builtin's integer cast sends it to qmin."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        units = torch.mul(x, scale.reciprocal())
        ctx.kept = kept_range(1.0, qmin, qmax)
        ctx.save_for_backward(units)
        return torch.round(units).clamp_(qmin, qmax).nan_to_num_(nan=qmin).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (units,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, units, *ctx.kept), None, None, None


def _define_library_ops() -> tuple[Optional[Callable], Optional[Callable]]:
    """(per-tensor op, per-channel op): the range-mask kernels as opaque torch.library ops for torch.compile on
    the CPU, or (None, None) before torch 2.4 (no ``custom_op``; compile then traces PerTensorFakeQuantCPU).

    Traced as pointwise ops, a fake quantizer makes inductor store a bool gradient mask, which its CPU code
    writes several times slower than a float (notes/qat_speed.md, seventh round); as ops, the compiled graph
    calls the eager kernels, which keep no mask, and they read their bounds at run time. Elementwise, they
    take any memory layout (``flexible_layout``), so inductor keeps its channels-last activations as they are.

    ``pow2q::fake_quant_cpu(x, scale, qmin, qmax, relu)`` gives RangeMaskFakeQuantCPU's values and gradient
    (ReluRangeMaskFakeQuantCPU's when ``relu``); ``pow2q::channel_fake_quant_cpu(x, scale, qmin, qmax)``
    ChannelRangeMaskFakeQuantCPU's (``scale`` broadcasts over x)."""
    if not hasattr(torch.library, "custom_op"):
        return None, None
    options: dict = {"mutates_args": ()}
    if "tags" in inspect.signature(torch.library.custom_op).parameters and hasattr(torch.Tag, "flexible_layout"):
        options["tags"] = (torch.Tag.flexible_layout,)

    @torch.library.custom_op("pow2q::fake_quant_cpu", **options)
    def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, relu: bool) -> torch.Tensor:
        return _fake_quant_values(x, scale, qmin, qmax)

    @torch.library.custom_op("pow2q::fake_quant_cpu_backward", **options)
    def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                            relu: bool) -> torch.Tensor:
        lo, hi = kept_range(float(scale), qmin, qmax)
        return torch.ops.aten.hardtanh_backward(grad, x, 0.0 if relu else lo, hi)

    @torch.library.custom_op("pow2q::channel_fake_quant_cpu", **options)
    def channel_fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        return _fake_quant_values(x, scale, qmin, qmax)

    @torch.library.custom_op("pow2q::channel_fake_quant_cpu_backward", **options)
    def channel_fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, qmin: int,
                                    qmax: int) -> torch.Tensor:
        # weights are small: recompute the exact quotient rather than keep it from the forward
        return torch.ops.aten.hardtanh_backward(grad, torch.mul(x, scale.reciprocal()), *kept_range(1.0, qmin, qmax))

    for op in (fake_quant, channel_fake_quant):
        op.register_fake(lambda x, *args: torch.empty_like(x))
    for op in (fake_quant_backward, channel_fake_quant_backward):
        op.register_fake(lambda grad, *args: torch.empty_like(grad))

    def save_input_and_scale(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.bounds = inputs[2:]

    def fake_quant_grad(ctx, grad):
        x, scale = ctx.saved_tensors
        return fake_quant_backward(grad, x, scale, *ctx.bounds), None, None, None, None

    def channel_fake_quant_grad(ctx, grad):
        x, scale = ctx.saved_tensors
        return channel_fake_quant_backward(grad, x, scale, *ctx.bounds), None, None, None

    fake_quant.register_autograd(fake_quant_grad, setup_context=save_input_and_scale)
    channel_fake_quant.register_autograd(channel_fake_quant_grad, setup_context=save_input_and_scale)
    return fake_quant, channel_fake_quant


compiled_fake_quant, compiled_channel_fake_quant = _define_library_ops()


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
