"""Power-of-2 fake quantization: an observer that picks an integer exponent k, plus the core
torch fake-quant ops with scale ``2**k / 2**(bits - signed)`` and zero point 0.

Example::

    fq = Pow2FakeQuantize(QuantSpec(bits=8), signed=True)
    fq.train()
    y = fq(x)          # observes x, sets the exponent, returns x fake-quantized
    fq.scale()         # tensor([0.0312]) == 2**-5 exactly
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from quant.config import QuantSpec
from quant.fq_ops import (EXP_MAX, EXP_MIN, MSE_CANDIDATES, ChannelRangeMaskFakeQuantCPU, PerTensorFakeQuantCPU,
                          RangeMaskFakeQuantCPU, ReluRangeMaskFakeQuantCPU, ceil_exponent, compiled_channel_fake_quant,
                          compiled_fake_quant, exponent_from_bound, has_half_kernel, pow2_scale, row_candidate_errors,
                          shift_errors, threshold_fake_quant)
from quant.histogram import ValueHistogram

LOGGER = logging.getLogger(__name__)
__all__ = ["Pow2FakeQuantize", "exponent_from_bound", "MSE_CANDIDATES"]


def _cpu_float(x: torch.Tensor) -> bool:
    """Whether x runs the CPU range-mask kernels (float32 on the CPU): as autograd Functions in eager mode,
    as torch.library ops while torch.compile traces (they read their bounds on the host)."""
    return x.device.type == "cpu" and x.dtype == torch.float32


class Pow2FakeQuantize(nn.Module):
    """Observer + fake quantizer whose scale is always an exact power of two.

    Args:
        spec: bits, granularity, rounding, observer, fixed exponent (``spec.signed`` is ignored:
            the caller decides signedness and passes it as ``signed``).
        signed: symmetric signed range ``[-2**(b-1), 2**(b-1)-1]`` or unsigned ``[0, 2**b - 1]``.
        num_channels: channels along ``spec.ch_axis`` when ``spec.per_channel``.

    Observation happens only when the observer is enabled and the module is training or
    ``calibrating`` is True; before the first observation (``calibrated == 0``) x passes unchanged.

    The three 0/1 flag buffers (``observer_enabled``, ``fake_quant_enabled``, ``calibrated``) travel in
    checkpoints; forward reads Python copies of them, so a training step reads nothing back from the
    device (on a GPU each read is a stall) and torch.compile sees the phase as Python state (a phase
    change recompiles once). The copies are set by the methods that change the flags and refreshed from
    the buffers where they are written wholesale: :meth:`load_state_dict`, :meth:`copy_host_state`
    (the EMA) and the collectives of :meth:`sync_across_ranks`. Code that writes a flag buffer by any
    other route calls :meth:`refresh_host_state`. The scale is computed from ``exponent`` at each call,
    never cached, so a DDP buffer broadcast or any in-place write is used at once.
    """

    # An EMA of the model copies this module's state instead of averaging it: an averaged exponent
    # would stop being an integer (utils.torch_utils.ModelEMA reads this flag).
    ema_copy_state = True

    def __init__(self, spec: QuantSpec, signed: bool, num_channels: int = 1):
        super().__init__()
        if spec.per_channel and num_channels < 1:
            raise ValueError(f"Pow2FakeQuantize: per-channel needs num_channels >= 1, got {num_channels}")
        self.spec = spec
        self.signed = bool(signed)
        self.bits = spec.bits
        self.quant_min = -(2 ** (self.bits - 1)) if self.signed else 0
        self.quant_max = 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1
        self.ch_axis = spec.ch_axis
        self.calibrating = False
        # Per-forward aggregation (see begin_step): the pre-step statistics and this step's range.
        self._step_stats: Optional[tuple] = None
        self._step_range: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # the 'current' observer's
        self._aggregate = False
        self._histogram = ValueHistogram() if spec.observer == "histogram" else None
        channels = num_channels if spec.per_channel else 1
        fixed = spec.fixed_exponent
        n_cand = MSE_CANDIDATES if spec.rounding == "mse" else 0
        self.register_buffer("exponent", torch.full((channels,), float(fixed or 0)))
        self.register_buffer("min_val", torch.full((channels,), float("inf")))
        self.register_buffer("max_val", torch.full((channels,), float("-inf")))
        self.register_buffer("mse_err", torch.zeros(channels, n_cand))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("observer_enabled", torch.tensor(0 if fixed is not None else 1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.tensor(1, dtype=torch.uint8))
        self.register_buffer("calibrated", torch.tensor(1 if fixed is not None else 0, dtype=torch.uint8))
        # always zero (power-of-2 scales are symmetric): kept so no forward allocates it; not in checkpoints
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32), persistent=False)
        # TQT: a learned log2 threshold per channel (or tensor); the exponent is its rounding. Kept equal
        # to the exponent while observing; sync_exponent_from_threshold() after each optimizer step.
        trained = spec.trained_threshold and fixed is None
        self.log2_threshold = nn.Parameter(torch.zeros(channels)) if trained else None
        self.refresh_host_state()

    # ---- public API ------------------------------------------------------------------------------
    @property
    def fixed(self) -> bool:
        """True when the range is pinned by ``spec.fixed_exponent``."""
        return self.spec.fixed_exponent is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing and (self.training or self.calibrating):
            self._observe(x.detach())
        if not (self._fake_quant_on and self._calibrated):
            return x
        if self.log2_threshold is not None and self.training and torch.is_grad_enabled():
            return self._threshold_fake_quant(x)
        return self._fake_quant(x)

    def fake_quant_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """``self(relu(x))`` (quant.frozen_view calls it for a fused conv's ReLU and the quantizer after it).
        For an unsigned per-tensor quantizer on a float32 CPU tensor it is one kernel:
        ReluRangeMaskFakeQuantCPU (under torch.compile, the same kernel as the library op
        ``pow2q::fake_quant_cpu``), the same values and gradient without the ReLU's passes; a histogram
        observer, when it runs (eager), counts relu(x) from x itself (ValueHistogram.add_after_relu)."""
        compiling = torch.compiler.is_compiling()
        fusable = (self.quant_min == 0 and not self.spec.per_channel and self.log2_threshold is None and _cpu_float(x)
                   and not (compiling and compiled_fake_quant is None))
        if self._observing and (self.training or self.calibrating):
            if not (fusable and not compiling and self._observe_histogram_after_relu(x.detach())):
                return self(torch.relu(x))
        elif not fusable:
            return self(torch.relu(x))
        if not self.is_active():
            return torch.relu(x)
        if compiling:
            return compiled_fake_quant(x, self.scale(), self.quant_min, self.quant_max, True)
        return ReluRangeMaskFakeQuantCPU.apply(x, self.scale(), self.quant_min, self.quant_max)

    def quantize_now(self, x: torch.Tensor) -> torch.Tensor:
        """x fake-quantized with the current scale whatever the enable flag says (x itself before the
        first observation); observes nothing. For reports that compare quantized and float tensors."""
        return self._fake_quant(x) if self._calibrated else x

    def observes_on_host(self) -> bool:
        """True while the observer runs and is the histogram one (it counts on the host, between compiled graphs)."""
        return self._observing and self._histogram is not None

    def is_active(self) -> bool:
        """True when forward fake-quantizes: calibrated and fake quantization enabled (no device sync)."""
        return self._fake_quant_on and self._calibrated

    def refresh_host_state(self) -> None:
        """Re-read the flag buffers into the Python copies forward uses (three device reads)."""
        self._observing = bool(self.observer_enabled)
        self._fake_quant_on = bool(self.fake_quant_enabled)
        self._calibrated = bool(self.calibrated)

    def copy_host_state(self, source: "Pow2FakeQuantize") -> None:
        """Take ``source``'s Python flag copies after its buffers were copied into this module's (the
        EMA does that each step: no device read)."""
        self._observing, self._fake_quant_on, self._calibrated = (
            source._observing, source._fake_quant_on, source._calibrated)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_host_state()

    def emits_int(self) -> bool:
        """True when the output is an int8/uint8 tensor in the integer network (and a Q/DQ pair in the
        exported file): active and at most 8 bits wide (ONNX QuantizeLinear before opset 21)."""
        return self.bits <= 8 and self.is_active()

    def scale(self) -> torch.Tensor:
        """Per-channel (C,) or per-tensor (1,) float32 scales, exact powers of two (a new tensor)."""
        return pow2_scale(self.exponent, self.bits, self.signed)

    def begin_step(self) -> None:
        """Start a new forward pass: until the next call, every observation this quantizer makes is
        merged into ONE batch range before the moving average is applied. A quantizer shared by
        several tensors (concat inputs and output, add inputs) is called once per tensor; without
        this the average would mix the ranges of the narrow inputs with the wide one."""
        self._step_stats = None
        self._step_range = None
        self._aggregate = True

    @torch.no_grad()
    def sync_exponent_from_threshold(self) -> None:
        """exponent = round(log2 threshold): call after every update of the trained threshold (the
        optimizer step), so eval, export and checkpoints see the exponent training used."""
        if self.log2_threshold is not None:
            self.exponent.copy_(torch.round(self.log2_threshold.detach().float()).clamp(EXP_MIN, EXP_MAX))

    def enable_observer(self, on: bool = True) -> None:
        """Start/stop observing; a fixed-range quantizer keeps its observer off."""
        if on and self.fixed:
            LOGGER.debug("observer stays off: fixed exponent %s", self.spec.fixed_exponent)
            return
        self.observer_enabled.fill_(int(bool(on)))
        self._observing = bool(on)

    def enable_fake_quant(self, on: bool = True) -> None:
        """Turn fake quantization on/off (off: identity, observers unaffected)."""
        self.fake_quant_enabled.fill_(int(bool(on)))
        self._fake_quant_on = bool(on)

    @torch.no_grad()
    def reset_observer(self) -> None:
        """Forget observed statistics (the current exponent stays until the next observation)."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.mse_err.zero_()
        self.num_observed.zero_()
        if self._histogram is not None:
            self._histogram.reset()

    @torch.no_grad()
    def sync_across_ranks(self) -> None:
        """Make every rank hold the same statistics and exponent (no-op without torch.distributed).

        min_val is reduced with MIN, max_val with MAX, candidate errors are averaged after being
        re-aligned to the common candidate window.
        """
        if self.fixed or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        observed = self.calibrated.float()  # ranks that never observed do not vote on errors
        if self._histogram is not None:
            self._histogram.sync_across_ranks(self.exponent.device)
        old_top = self._window_top() if self.spec.rounding == "mse" else None
        dist.all_reduce(self.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(self.max_val, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.calibrated, op=dist.ReduceOp.MAX)
        dist.all_reduce(self.num_observed, op=dist.ReduceOp.MAX)
        if old_top is not None:
            shifted = shift_errors(self.mse_err, old_top, self._window_top(), fill=None) * observed
            votes = observed.reshape(1).clone()
            dist.all_reduce(shifted, op=dist.ReduceOp.SUM)
            dist.all_reduce(votes, op=dist.ReduceOp.SUM)
            self.mse_err.copy_(shifted / votes.clamp_min(1.0))
        self.refresh_host_state()  # the collectives rewrote the flag buffers
        if self._calibrated:
            self._update_exponent()

    @torch.no_grad()
    def clipping_ratio(self, x: torch.Tensor) -> float:
        """Fraction of the values of ``x`` outside the representable range (0.0 before calibration)."""
        if not self._calibrated or x.numel() == 0:
            return 0.0
        scale = self._broadcast(self.scale().to(x.device), x)
        xf = x.detach().float()
        outside = (xf < self.quant_min * scale) | (xf > self.quant_max * scale)
        return float(outside.float().mean())

    def extra_repr(self) -> str:
        name = f"{'int' if self.signed else 'uint'}{self.bits}"
        grain = " per-channel" if self.spec.per_channel else ""
        if not self._calibrated:
            return f"{name}{grain}, uncalibrated, {self.spec.rounding}"
        k = self.scale().log2().round().to(torch.int64)
        lo, hi = int(k.min()), int(k.max())
        scale = f"scale 2^{lo}" if lo == hi else f"scale 2^{lo} .. 2^{hi}"
        tail = " (fixed)" if self.fixed else f", {self.spec.rounding}"
        tail += ", trained threshold" if self.log2_threshold is not None else ""
        return f"{name}{grain}, {scale}{tail}"

    # ---- internals -------------------------------------------------------------------------------
    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        if scale.device != x.device:
            scale = scale.to(x.device)
        if x.dtype == torch.float32 or has_half_kernel(x):
            return self._fake_quant_op(x, scale)
        return self._fake_quant_op(x.float(), scale).to(x.dtype)

    def _threshold_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        shape: tuple = ()
        if self.spec.per_channel:
            dims = [1] * x.dim()
            dims[self._axis(x)] = -1
            shape = tuple(dims)
        return threshold_fake_quant(x, self.log2_threshold, shape, self.bits, self.signed,
                                    self.quant_min, self.quant_max)

    def _fake_quant_op(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        zero = self.zero_point if self.zero_point.device == scale.device else self.zero_point.to(scale.device)
        cpu, compiling = _cpu_float(x), torch.compiler.is_compiling()
        qmin, qmax = self.quant_min, self.quant_max
        if self.spec.per_channel:
            if cpu and not compiling:
                return ChannelRangeMaskFakeQuantCPU.apply(x, self._broadcast(scale, x), qmin, qmax)
            if cpu and compiled_channel_fake_quant is not None:
                return compiled_channel_fake_quant(x, self._broadcast(scale, x), qmin, qmax)
            return torch.fake_quantize_per_channel_affine(x, scale, zero, self._axis(x), qmin, qmax)
        if cpu and not compiling:
            return RangeMaskFakeQuantCPU.apply(x, scale, qmin, qmax)
        if cpu and compiled_fake_quant is not None:
            return compiled_fake_quant(x, scale, qmin, qmax, False)
        if cpu:  # torch < 2.4 has no library ops: compile traces the float-mask kernel
            return PerTensorFakeQuantCPU.apply(x, scale, qmin, qmax)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, qmin, qmax)

    def _axis(self, x: torch.Tensor) -> int:
        axis = self.ch_axis % x.dim() if x.dim() else 0
        if x.dim() == 0 or x.shape[axis] != self.exponent.numel():
            raise ValueError(f"Pow2FakeQuantize: expected {self.exponent.numel()} channels on axis "
                             f"{self.ch_axis}, got input shape {tuple(x.shape)}")
        return axis

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as float32 (C, N): one row per channel (or a single row per-tensor)."""
        xf = x.float()
        if not self.spec.per_channel:
            return xf.reshape(1, -1)
        return xf.movedim(self._axis(x), 0).reshape(self.exponent.numel(), -1)

    def _broadcast(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.per_channel:
            return values.reshape(())
        shape = [1] * x.dim()
        shape[self._axis(x)] = -1
        return values.reshape(shape)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Fold this batch's range into the statistics and update the exponent, all on the device
        (the first-observation test is a device boolean, not a Python branch, so nothing syncs)."""
        if self._histogram is not None:
            self._observe_histogram(x)
            return
        mse = self.spec.rounding == "mse"
        if not (mse or self.spec.per_channel):  # per-tensor range: one pass in x's own dtype and layout
            if x.numel() == 0:
                return
            rows = None
            lo, hi = (v.float().reshape(1) for v in torch.aminmax(x))
        else:
            rows = self._rows(x)
            if rows.shape[1] == 0:
                return
            lo, hi = torch.aminmax(rows, dim=1)
        if self.spec.observer == "current" and not mse:
            self._observe_current(lo, hi)
            return
        lo, hi = self._merge_with_step(lo, hi)
        first = (self.calibrated == 0) | torch.isinf(self.min_val).any()  # 0-dim: replace every row
        old_top = self._window_top() if mse else None
        observer = self.spec.observer
        if observer == "current":
            new_lo, new_hi = lo, hi
        elif observer == "minmax":
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:  # ema_minmax
            c = float(self.spec.averaging_constant)
            new_lo, new_hi = self.min_val + c * (lo - self.min_val), self.max_val + c * (hi - self.max_val)
        self.min_val.copy_(torch.where(first, lo, new_lo))
        self.max_val.copy_(torch.where(first, hi, new_hi))
        self.num_observed.add_(1)
        if mse:
            self._accumulate_errors(rows, old_top, first)
        self._update_exponent()
        self._mark_calibrated()

    def _observe_current(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The 'current' observer without the MSE search (the weights' default): min/max are this step's
        range alone, so unlike the running observers it needs neither the first-observation test nor the
        pre-step statistics. Each weight observer runs once per step; these few ops are most of its cost."""
        if self._aggregate:  # a later call in the same step widens the step's range
            if self._step_range is not None:
                lo, hi = torch.minimum(lo, self._step_range[0]), torch.maximum(hi, self._step_range[1])
            self._step_range = (lo, hi)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.num_observed.add_(1)
        self.exponent.copy_(exponent_from_bound(self._bound(), self.spec.rounding))
        self._threshold_follows_exponent()
        self._mark_calibrated()

    @torch.compiler.disable  # host-side by design: torch.compile runs it between graphs, untraced
    def _observe_histogram(self, x: torch.Tensor) -> None:
        """Count x into the histogram and keep min/max over everything seen (host reads: the
        histogram's range is a Python int; this runs only while calibrating)."""
        seen = self._histogram.add(x)
        if seen is not None:
            self._record_histogram_range(*seen)

    @torch.compiler.disable
    def _observe_histogram_after_relu(self, x: torch.Tensor) -> bool:
        """``_observe_histogram(relu(x))`` without computing relu(x); False, observing nothing, when there is
        no histogram observer or x is empty or not all finite (the caller then observes relu(x))."""
        seen = self._histogram.add_after_relu(x) if self._histogram is not None else None
        if seen is None:
            return False
        self._record_histogram_range(*seen)
        return True

    def _record_histogram_range(self, seen_lo: float, seen_hi: float) -> None:
        """Widen min/max by what the histogram just counted and update the exponent. On the host: the
        histogram observer is per tensor, so min/max are one float32 each (never NaN: only finite counted
        values and the reset's infinities reach them), and Python's min/max of them are exact."""
        lo, hi = float(self.min_val), float(self.max_val)
        if not self._calibrated or math.isinf(lo):  # the first observation replaces them
            lo, hi = seen_lo, seen_hi
        else:
            lo, hi = min(lo, seen_lo), max(hi, seen_hi)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        self.num_observed.add_(1)
        bound = max(abs(lo), abs(hi)) if self.signed else max(hi, 0.0)
        self.exponent.fill_(self._histogram_exponent(bound))
        self._threshold_follows_exponent()
        self._mark_calibrated()

    def _mark_calibrated(self) -> None:
        if not self._calibrated:
            self.calibrated.fill_(1)
            self._calibrated = True

    def _histogram_exponent(self, bound: Optional[float] = None) -> float:
        """k from the histogram: the least-error candidate ('mse'), else the percentile bound's exponent.
        ``bound``: what :meth:`_bound` holds, when the caller has it on the host."""
        hist = self._histogram
        bound = float(self._bound()) if bound is None else bound
        if self.spec.rounding == "mse":
            top = ceil_exponent(bound)  # the candidate window's top, _window_top() on the host
            return float(hist.mse_exponent(range(top - MSE_CANDIDATES + 1, top + 1), self.bits, self.signed))
        bound = hist.percentile_bound(self.spec.percentile) if self.spec.percentile < 100 else bound
        return float(exponent_from_bound(torch.tensor([bound]), self.spec.rounding))

    def _merge_with_step(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Within one forward (after begin_step), widen this call's range by the earlier calls' and
        roll min/max back to their pre-step values, so the step updates them once."""
        if not self._aggregate:
            return lo, hi
        if self._step_stats is None:
            self._step_stats = (self.min_val.clone(), self.max_val.clone(), self._calibrated, lo, hi)
            return lo, hi
        min0, max0, calibrated0, lo_acc, hi_acc = self._step_stats
        lo, hi = torch.minimum(lo, lo_acc), torch.maximum(hi, hi_acc)
        self.min_val.copy_(min0)
        self.max_val.copy_(max0)
        if not calibrated0:
            self.calibrated.fill_(0)
            self._calibrated = False
        self._step_stats = (min0, max0, calibrated0, lo, hi)
        return lo, hi

    def _bound(self) -> torch.Tensor:
        if self.signed:
            return torch.maximum(self.min_val.abs(), self.max_val.abs())
        return self.max_val.clamp_min(0.0)

    def _window_top(self) -> torch.Tensor:
        return exponent_from_bound(self._bound(), "ceil")

    def _update_exponent(self) -> None:
        self._set_exponent()
        self._threshold_follows_exponent()

    def _threshold_follows_exponent(self) -> None:
        """While observing, a trained threshold is the observed exponent (it trains once observers freeze)."""
        if self.log2_threshold is not None:
            self.log2_threshold.data.copy_(self.exponent)

    def _set_exponent(self) -> None:
        if self._histogram is not None:
            if not self._histogram.empty:
                self.exponent.fill_(self._histogram_exponent())
            return
        if self.spec.rounding != "mse":
            self.exponent.copy_(exponent_from_bound(self._bound(), self.spec.rounding))
            return
        best = torch.argmin(self.mse_err, dim=1).float()  # ties -> the smaller (finer) scale
        k = self._window_top() - (MSE_CANDIDATES - 1) + best
        self.exponent.copy_(k.clamp(EXP_MIN, EXP_MAX))

    def _accumulate_errors(self, rows: torch.Tensor, old_top: torch.Tensor, first: torch.Tensor) -> None:
        """Average this batch's candidate errors into ``mse_err`` (replace them on a first observation)."""
        top = self._window_top()
        current = row_candidate_errors(rows, top, self.bits, self.signed, self.quant_min, self.quant_max)
        if self.spec.observer == "current":
            self.mse_err.copy_(current)
            return
        history = shift_errors(self.mse_err, old_top, top, fill=current)
        if self.spec.observer == "minmax":
            # running mean over all observations; the double division then float32, as a Python float would be
            factor = (1.0 / self.num_observed.double()).float()
        else:
            factor = float(self.spec.averaging_constant)
        self.mse_err.copy_(torch.where(first, current, history + factor * (current - history)))
