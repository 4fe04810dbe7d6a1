"""A value histogram over a power-of-2 range, kept across every calibration batch.

The histogram behind the 'histogram' observer holds two rows of ``HIST_BINS`` bins each: row 0
counts the magnitudes of non-negative values, row 1 those of negative values, both over
``[0, 2**top]``. When a batch holds a value beyond ``2**top`` the range doubles until it fits, and
doubling merges neighbouring bins pairwise, which is exact: the bin edges of the wider range are
edges of the narrower one. So every image given to calibration counts with the same weight, and
the result does not depend on the batch size, and on the batch order only through the resolution
at which the earliest batches were binned.

From the histogram come the exponent that minimises the mean squared quantization error over the
candidates (:func:`candidate_errors`) and a percentile bound (:func:`percentile_bound`).

Example::

    hist, top = empty_histogram(), None
    for x in batches:
        hist, top = add_to_histogram(hist, top, x)
    errors = candidate_errors(hist, top, [top - 1, top], bits=8, signed=False)
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch

HIST_BINS = 2 ** 15  # bin width 2**top / 32768: 1/8 of the finest 8-bit step among 5 candidate exponents
_EXP_MIN, _EXP_MAX = -48, 48


def empty_histogram(device: torch.device | str = "cpu") -> torch.Tensor:
    """A (2, HIST_BINS) float64 histogram with no counts (float64: exact counts up to 2**53)."""
    return torch.zeros(2, HIST_BINS, dtype=torch.float64, device=device)


def needed_exponent(bound: float) -> int:
    """Smallest integer t with ``bound <= 2**t`` (clamped to the representable exponents)."""
    if not bound > 0.0:
        return _EXP_MIN
    return int(min(max(math.ceil(math.log2(bound)), _EXP_MIN), _EXP_MAX))


def widen(hist: torch.Tensor, shift: int) -> torch.Tensor:
    """The same counts over a range ``2**shift`` times wider (bins merged in groups of 2**shift)."""
    if shift <= 0:
        return hist
    bins = hist.shape[1]
    factor = 2 ** shift
    out = torch.zeros_like(hist)
    if factor >= bins:
        out[:, 0] = hist.sum(dim=1)
    else:
        out[:, : bins // factor] = hist.reshape(2, bins // factor, factor).sum(dim=2)
    return out


def _value_range(x: torch.Tensor) -> Optional[tuple[torch.Tensor, float, float]]:
    """(x flattened as float32, its min, its max: NaN or infinite when x holds such values); None when x
    is empty."""
    xf = x.detach().float().reshape(-1)
    if xf.numel() == 0:
        return None
    lo, hi = (float(v) for v in torch.aminmax(xf))
    return xf, lo, hi


def finite_range(x: torch.Tensor) -> Optional[tuple[torch.Tensor, float, float]]:
    """(x flattened as float32 without its NaN/inf values, their min, their max); None when none is left.
    One host read of the range: this runs only while calibrating."""
    values = _value_range(x)
    if values is None:
        return None
    xf, lo, hi = values
    if not (math.isfinite(lo) and math.isfinite(hi)):
        xf = xf[torch.isfinite(xf)]
        if xf.numel() == 0:
            return None
        lo, hi = float(xf.min()), float(xf.max())
    return xf, lo, hi


@torch.no_grad()
def add_to_histogram(hist: torch.Tensor, top: Optional[int], x: torch.Tensor,
                     values: Optional[tuple[torch.Tensor, float, float]] = None,
                     after_relu: bool = False) -> tuple[torch.Tensor, int]:
    """Count the finite values of ``x`` into ``hist``, in place (widening makes a new tensor first if
    needed); returns the histogram and its range exponent. ``top=None`` means the histogram is empty.
    ``values``: what :func:`finite_range` returned for ``x``, when the caller has it already.
    ``after_relu``: count relu(x) instead, every negative value as a zero (x must be all finite)."""
    values = values if values is not None else finite_range(x)
    if values is None:
        return hist, (top if top is not None else _EXP_MIN)
    xf, lo, hi = values
    negatives_as_zeros = after_relu and lo < 0
    if after_relu:
        lo, hi = max(lo, 0.0), max(hi, 0.0)
    need = needed_exponent(max(hi, -lo))
    if top is None:
        top = need
    elif need > top:
        hist, top = widen(hist, need - top), need
    _add_counts(hist, xf, lo, hi, top, negatives_as_zeros)
    return hist, top


# torch.histc counts in the input's dtype (float32): exact up to 2**24 per bin, so bigger tensors go in chunks.
_HISTC_CHUNK = 2 ** 24


def _add_counts(hist: torch.Tensor, xf: torch.Tensor, lo: float, hi: float, top: int,
                negatives_as_zeros: bool = False) -> None:
    """Add the counts of the finite float32 values ``xf`` (all within 2**top in magnitude, none below
    ``lo`` or above ``hi``) to the (2, bins) float64 ``hist``: row 0 the magnitudes of values >= 0 (-0.0
    included), row 1 those of negative values. ``negatives_as_zeros``: ``xf`` also holds negative values
    (``lo`` is then 0), each counted as a zero, as relu(xf) would be.

    The bin of v is floor(|v| * bins / 2**top): a multiplication by a power of two and a floor, both
    exact, so a value lands in the same bin whatever range it is binned at (widening stays exact)."""
    if xf.device.type == "cpu" and lo >= 0:  # (histc on CUDA is not deterministic)
        add_nonnegative = _add_histc if histc_is_faster() else _add_bincount
        add_nonnegative(hist[0], xf, top, hi, negatives_as_zeros)
    else:
        hist += bincount_counts(xf.clamp(min=0.0) if negatives_as_zeros else xf, top, hist.shape[1])


def _add_histc(row: torch.Tensor, xf: torch.Tensor, top: int, hi: float, negatives_as_zeros: bool = False) -> None:
    """Add the counts of non-negative values to the float64 ``row`` by torch.histc, which computes exactly
    the bin index above in one pass (no index tensor). (For signed values two passes and the zeros'
    correction cost more than bincount.) Negative values counted as zeros are clamped to 0 first: histc
    leaves out values below its range, and is about 2x slower on them (notes/qat_speed.md, eighth round)."""
    if negatives_as_zeros:
        xf = xf.clamp(min=0.0)
    for chunk in xf.split(_HISTC_CHUNK):
        row += torch.histc(chunk, row.numel(), 0.0, 2.0 ** top)


def _add_bincount(row: torch.Tensor, xf: torch.Tensor, top: int, hi: float, negatives_as_zeros: bool = False) -> None:
    """The same counts as :func:`_add_histc`, by bincount over integer bin indices (truncation is the floor
    for values >= 0; int16 while the indices fit, the cheapest cast); only a largest value ``hi`` of exactly
    2**top needs the clamp into the last bin, and negative values counted as zeros the clamp at bin 0."""
    bins = row.numel()
    index = xf * (bins / 2.0 ** top)
    if hi >= 2.0 ** top or negatives_as_zeros:
        index.clamp_(min=0.0 if negatives_as_zeros else None, max=bins - 1 if hi >= 2.0 ** top else None)
    row += torch.bincount(index.to(torch.int16 if bins <= 2 ** 15 else torch.int32), minlength=bins)


@functools.lru_cache(maxsize=1)
def histc_is_faster() -> bool:
    """Whether torch.histc counts non-negative float32 values faster than bincount on this CPU, timed once
    per process on 2**20 values (about 30 ms). Both give the same counts; which is faster depends on the
    CPU: on the Intel machine of notes/qat_speed.md histc was about 2x faster, on an AVX2-only AMD EPYC
    it was 4x slower (``python -m bench.observer_cost``)."""
    import time

    x = torch.rand(2 ** 20, generator=torch.Generator().manual_seed(0)) * 7.5
    row = torch.zeros(HIST_BINS, dtype=torch.float64)

    def best_ms(add) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            add(row, x, 3, 7.5)
            times.append(time.perf_counter() - start)
        return min(times)

    return best_ms(_add_histc) < best_ms(_add_bincount)


def nonnegative_counts(xf: torch.Tensor, top: int, bins: int, by: str = "histc",
                       after_relu: bool = False) -> torch.Tensor:
    """(2, bins) float64 counts of non-negative values as the CPU path adds them, ``by`` 'histc' or
    'bincount' (the layout of :func:`bincount_counts`, which tests compare both with); ``after_relu``:
    the counts of relu(xf), xf's negative values counted as zeros."""
    hist = torch.zeros(2, bins, dtype=torch.float64, device=xf.device)
    add = {"histc": _add_histc, "bincount": _add_bincount}[by]
    add(hist[0], xf, top, max(float(xf.max()), 0.0) if xf.numel() else 0.0, after_relu)
    return hist


def bincount_counts(xf: torch.Tensor, top: int, bins: int) -> torch.Tensor:
    """:func:`_counts` by bincount over computed bin indices."""
    index = (xf.abs() * (bins / 2.0 ** top)).floor_().clamp_(max=bins - 1).long()
    index += (xf < 0).long() * bins  # row 1: negative values
    return torch.bincount(index, minlength=2 * bins).reshape(2, bins).double()


def bin_centres(top: int, bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Centres of the magnitude bins over [0, 2**top], float64."""
    width = 2.0 ** top / bins
    return (torch.arange(bins, dtype=torch.float64, device=device) + 0.5) * width


@functools.lru_cache(maxsize=64)
def _unit_bin_errors(offset: int, bins: int, bits: int, signed: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of each bin centre of the range [0, 1] (top 0) quantized with exponent ``offset``,
    as a non-negative value (row 0) and as a negative one (row 1). For a range 2**top and exponent
    top + offset every centre, step and error scale by an exact power of two, so one table per offset
    serves every range."""
    centres = bin_centres(0, bins, device)
    step = 2.0 ** (offset - (bits - int(signed)))
    pos_max = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    neg_max = 2 ** (bits - 1) if signed else 0  # an unsigned quantizer maps every negative value to 0
    levels = torch.round(centres / step)
    err_pos = (centres - levels.clamp(max=pos_max) * step).pow(2)
    err_neg = (centres - levels.clamp(max=neg_max) * step).pow(2)
    return err_pos, err_neg


@functools.lru_cache(maxsize=16)
def _unit_error_tables(offsets: tuple[int, ...], bins: int, bits: int, signed: bool,
                       device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_unit_bin_errors` of every offset stacked: (len(offsets), bins) for non-negative values and
    for negative ones, so the errors of all candidates are two matrix-vector products."""
    tables = [_unit_bin_errors(k, bins, bits, signed, device) for k in offsets]
    return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])


def candidate_errors(hist: torch.Tensor, top: int, exponents: Sequence[int], bits: int, signed: bool,
                     total: Optional[float] = None, negatives: bool = True) -> torch.Tensor:
    """Mean squared fake-quant error of the histogrammed values for each exponent k in ``exponents``
    (scale ``2**k / 2**(bits - signed)``, zero point 0), each bin taken at its centre.

    The per-bin errors come from :func:`_unit_bin_errors` scaled by 4**top: scaling by a power of two
    is exact, so the result is what computing them at 2**top gives, up to the rounding of the sums (one
    matrix-vector product for all candidates: 4-5x faster than a sum per candidate, tests compare the
    two). ``total`` (the number of values counted) and ``negatives=False`` (row 1 is all zero) are what
    the caller may know already: both only skip work (a zero row adds exact zeros), the result is the same."""
    total = float(hist.sum()) if total is None else float(total)
    if total == 0.0:
        return torch.zeros(len(exponents), dtype=torch.float64)
    offsets = tuple(int(k) - top for k in exponents)
    pos, neg = _unit_error_tables(offsets, hist.shape[1], bits, bool(signed), str(hist.device))
    errors = torch.mv(pos, hist[0])
    if negatives:
        errors += torch.mv(neg, hist[1])
    return errors.cpu() * 4.0 ** top / total


def percentile_bound(hist: torch.Tensor, top: int, percentile: float) -> float:
    """The magnitude below which ``percentile`` % of the histogrammed values lie (upper bin edge)."""
    counts = hist.sum(dim=0)
    total = float(counts.sum())
    if total == 0.0:
        return 0.0
    cumulative = torch.cumsum(counts, dim=0)
    index = int(torch.searchsorted(cumulative, torch.tensor(total * percentile / 100.0, dtype=cumulative.dtype,
                                                                device=cumulative.device)))
    return (min(index, hist.shape[1] - 1) + 1) * 2.0 ** top / hist.shape[1]


class ValueHistogram:
    """The histogram of one quantizer: a plain object, not a buffer, so it never enters a checkpoint
    (the chosen exponent does) and DDP never broadcasts it; each rank counts its own images until
    :meth:`sync_across_ranks` sums them. It also keeps, as Python values, how many values it counted and
    whether any was negative, which the exponent search would otherwise re-read from the 65536 bins at
    every observation."""

    def __init__(self) -> None:
        self.reset()

    @property
    def empty(self) -> bool:
        return self.hist is None or self.top is None

    def reset(self) -> None:
        self.hist: Optional[torch.Tensor] = None
        self.top: Optional[int] = None
        self.total = 0  # values counted (exact: a Python int)
        self.negatives = False  # whether row 1 holds any count

    def add(self, x: torch.Tensor) -> Optional[tuple[float, float]]:
        """Count x's finite values; returns their (min, max), or None when x has none."""
        values = finite_range(x)
        if values is None:
            return None
        self.add_values(values, x.device)
        return values[1], values[2]

    def add_after_relu(self, x: torch.Tensor) -> Optional[tuple[float, float]]:
        """Count relu(x) without computing it (each negative value counts as a zero) and return relu(x)'s
        (min, max); None, counting nothing, when x is empty or holds a NaN or an infinity (relu(x) would
        then keep a different set of values: the caller counts relu(x) itself)."""
        values = _value_range(x)
        if values is None or not (math.isfinite(values[1]) and math.isfinite(values[2])):
            return None
        _, lo, hi = values
        self.add_values(values, x.device, after_relu=True)
        return max(lo, 0.0), max(hi, 0.0)

    def add_values(self, values: tuple[torch.Tensor, float, float], device: torch.device,
                   after_relu: bool = False) -> None:
        """Count ``values`` as :func:`finite_range` returns them: (finite float32 values, min, max), the
        range covering the values (bench.observer_cost passes a subset of a tensor with the whole range);
        ``after_relu``: count relu of them (:func:`add_to_histogram`)."""
        hist = self.hist
        if hist is None:
            hist = empty_histogram(device)
        elif hist.device != device:
            hist = hist.to(device)
        self.hist, self.top = add_to_histogram(hist, self.top, values[0], values, after_relu)
        self.total += values[0].numel()
        self.negatives = self.negatives or (values[1] < 0 and not after_relu)

    def mse_exponent(self, exponents: Sequence[int], bits: int, signed: bool) -> int:
        """The candidate with the smallest error; ties go to the smaller (finer) exponent."""
        errors = candidate_errors(self.hist, self.top, exponents, bits, signed, self.total, self.negatives)
        return int(exponents[int(torch.argmin(errors))])

    def percentile_bound(self, percentile: float) -> float:
        return percentile_bound(self.hist, self.top, percentile)

    @torch.no_grad()
    def sync_across_ranks(self, device: torch.device) -> None:
        """Sum every rank's counts over the widest rank's range (torch.distributed must be initialised)."""
        import torch.distributed as dist

        top = torch.tensor([self.top if self.top is not None else _EXP_MIN - 1], dtype=torch.int64, device=device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        common = int(top)
        hist = self.hist.to(device) if self.hist is not None else empty_histogram(device)
        if self.top is not None:
            hist = widen(hist, common - self.top)
        dist.all_reduce(hist, op=dist.ReduceOp.SUM)
        if common >= _EXP_MIN:
            self.hist, self.top = hist, common
            self.total = int(hist.sum())  # the counts of every rank (exact below 2**53)
            self.negatives = bool(hist[1].any())
