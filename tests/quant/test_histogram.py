"""Histogram calibration (quant/histogram.py and the 'histogram' observer of Pow2FakeQuantize)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quant.calibrate import calibrate
from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.histogram import (HIST_BINS, ValueHistogram, add_to_histogram, bin_centres, bincount_counts,
                             candidate_errors, empty_histogram, histc_is_faster, nonnegative_counts,
                             percentile_bound, widen)
from quant.prepare import prepare
from quant.schedule import iter_quantizers


def _brute_force_errors(x: torch.Tensor, exponents, bits: int, signed: bool) -> torch.Tensor:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    out = []
    for k in exponents:
        step = 2.0 ** (k - (bits - int(signed)))
        q = torch.clamp(torch.round(x.double() / step), qmin, qmax) * step
        out.append(float((q - x.double()).pow(2).mean()))
    return torch.tensor(out, dtype=torch.float64)


def test_widen_keeps_every_count_and_is_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5000, generator=gen) * 0.9
    narrow, top = add_to_histogram(empty_histogram(), None, x)
    assert top == 0 and float(narrow.sum()) == 5000
    wide, _ = add_to_histogram(empty_histogram(), 2, x)  # the same values binned over a 4x range
    assert torch.equal(widen(narrow, 2), wide)
    assert float(widen(narrow, 40).sum()) == 5000  # wider than the bin count: all in the first bin


def test_candidate_errors_match_the_tensor():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(20000, generator=gen), torch.tensor([9.0, -7.5])])  # two outliers
    hist, top = add_to_histogram(empty_histogram(), None, x)
    exps = list(range(top - 4, top + 1))
    est = candidate_errors(hist, top, exps, bits=8, signed=True)
    true = _brute_force_errors(x, exps, bits=8, signed=True)
    assert int(torch.argmin(est)) == int(torch.argmin(true))
    assert torch.allclose(est, true, rtol=0.05)


def _errors_at_scale(hist: torch.Tensor, top: int, exponents, bits: int, signed: bool) -> torch.Tensor:
    """candidate_errors computed directly at the range 2**top (no table reuse), as it was first written."""
    total = float(hist.sum())
    centres = bin_centres(top, hist.shape[1])
    pos_max = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    neg_max = 2 ** (bits - 1) if signed else 0
    out = []
    for k in exponents:
        step = 2.0 ** (k - (bits - int(signed)))
        levels = torch.round(centres / step)
        err_pos = (centres - levels.clamp(max=pos_max) * step).pow(2)
        err_neg = (centres - levels.clamp(max=neg_max) * step).pow(2)
        out.append(float((hist[0] * err_pos + hist[1] * err_neg).sum()) / total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale,bits,signed", [(1e-3, 8, True), (3.0, 8, False), (700.0, 4, True), (2e-9, 8, False)])
def test_candidate_errors_from_unit_tables_equal_errors_at_scale(scale, bits, signed):
    """The stacked unit tables give the errors computed at the range itself, to the rounding of the sums."""
    x = torch.randn(30000, generator=torch.Generator().manual_seed(5)) * scale
    x = x if signed else x.abs()
    hist, top = add_to_histogram(empty_histogram(), None, x)
    exps = list(range(top - 6, top + 2))
    got, want = candidate_errors(hist, top, exps, bits, signed), _errors_at_scale(hist, top, exps, bits, signed)
    assert torch.allclose(got, want, rtol=1e-12, atol=0) and int(torch.argmin(got)) == int(torch.argmin(want))


def test_value_histogram_keeps_its_count_and_sign_and_picks_the_same_exponent():
    gen = torch.Generator().manual_seed(9)
    for signed in (False, True):
        h = ValueHistogram()
        for scale in (0.5, 3.0, 1.5):  # the second batch widens the range
            x = torch.randn(4000, generator=gen) * scale
            h.add(x if signed else x.abs())
        h.add(torch.tensor([float("nan"), 1.0]))  # NaN is not counted
        assert h.total == int(h.hist.sum()) == 3 * 4000 + 1
        assert h.negatives == signed == bool(h.hist[1].any())
        exps = list(range(h.top - 4, h.top + 1))
        shortcut = candidate_errors(h.hist, h.top, exps, 8, signed, h.total, h.negatives)
        assert torch.equal(shortcut, candidate_errors(h.hist, h.top, exps, 8, signed))
    h.reset()
    assert h.empty and h.total == 0 and not h.negatives


@pytest.mark.parametrize("by", ["histc", "bincount"])
def test_nonnegative_counters_equal_bincount_counts_on_bin_edges(by):
    """Both CPU counters of non-negative values (histogram.histc_is_faster picks one per machine) bin every
    value as bincount_counts does: on bin edges, at exactly 2**top (the last bin), and with the largest
    value below 2**top (where the bincount counter skips its clamp)."""
    gen = torch.Generator().manual_seed(6)
    top = 3
    edge = 2.0 ** top
    width = edge / HIST_BINS
    x = torch.cat([torch.randn(50000, generator=gen).clamp(-edge, edge), torch.randn(2000, generator=gen).half().float(),
                   torch.tensor([edge, 0.0, -0.0, width, 3 * width, edge - width / 2, edge / 2])]).abs()
    x[:7] = torch.tensor([0.0, -0.0, -0.0, edge, edge, width, width])  # abs() would turn -0.0 into 0.0
    below = x[x < edge - width / 2]
    for values in (x, below):
        counts = nonnegative_counts(values, top, HIST_BINS, by)
        assert torch.equal(counts, bincount_counts(values, top, HIST_BINS))
        assert float(counts.sum()) == values.numel()
    assert int(nonnegative_counts(x, top, HIST_BINS, by)[0, -1]) >= 2  # the two values at exactly 2**top


@pytest.mark.parametrize("by", ["histc", "bincount"])
def test_counters_count_relu_of_signed_values(by):
    """Counting relu(x) from x (the ReLU folded into its quantizer while observing): both counters give
    relu(x)'s counts, each negative value a zero, on bin edges, at exactly 2**top and with -0.0."""
    gen = torch.Generator().manual_seed(7)
    top = 3
    edge = 2.0 ** top
    width = edge / HIST_BINS
    x = torch.cat([torch.randn(50000, generator=gen).clamp(-edge, edge),
                   torch.tensor([edge, 0.0, -0.0, -width, width, edge - width / 2, -edge])])
    counts = nonnegative_counts(x, top, HIST_BINS, by, after_relu=True)
    assert torch.equal(counts, bincount_counts(torch.relu(x), top, HIST_BINS))
    assert int(counts[0, 0]) >= int((x <= 0).sum()) and float(counts.sum()) == x.numel()
    hist, got_top = add_to_histogram(empty_histogram(), None, x, after_relu=True)
    assert got_top == top and torch.equal(hist, counts)


def test_histogram_counts_the_same_whichever_counter_the_machine_picks(monkeypatch):
    import quant.histogram as histogram

    histc_is_faster.cache_clear()
    first = histc_is_faster()
    assert isinstance(first, bool) and histc_is_faster() is first  # timed once per process
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(1)).relu() * 3
    got = []
    for pick in (True, False):
        monkeypatch.setattr(histogram, "histc_is_faster", lambda pick=pick: pick)
        h = ValueHistogram()
        for scale in (1.0, 4.0):  # the second batch widens the range
            h.add(x * scale)
        got.append((h.top, h.hist))
    assert got[0][0] == got[1][0] and torch.equal(got[0][1], got[1][1])


def test_mse_exponent_picks_the_known_optimum_not_the_max():
    # 100,000 normal values: the max (about 4.4) needs 2^3, but the least-error range for int8 is 2^2:
    # the few values beyond 4 cost less clipped than the doubled step would cost on all the others.
    x = torch.randn(100000, generator=torch.Generator().manual_seed(2))
    fq = Pow2FakeQuantize(QuantSpec(observer="histogram", rounding="mse"), signed=True).train()
    fq(x)
    top = int(torch.ceil(torch.log2(x.abs().max())))
    window = list(range(top - 4, top + 1))
    assert int(fq.exponent) == window[int(torch.argmin(_brute_force_errors(x, window, 8, True)))]
    assert int(fq.exponent) == 2 and top == 3
    ceil = Pow2FakeQuantize(QuantSpec(observer="histogram", rounding="ceil"), signed=True).train()
    ceil(x)
    assert int(ceil.exponent) == 3


def test_percentile_bound_and_exponent():
    x = torch.arange(1, 1001, dtype=torch.float32)
    hist, top = add_to_histogram(empty_histogram(), None, x)
    assert percentile_bound(hist, top, 99.0) == pytest.approx(990, abs=2 ** top / HIST_BINS + 1e-6)
    fq = Pow2FakeQuantize(QuantSpec(observer="histogram", rounding="ceil", percentile=50.0), signed=False).train()
    fq(x)
    assert int(fq.exponent) == 9  # the median 500 needs 2^9; the max would need 2^10


def test_non_finite_values_are_not_counted():
    hist, top = add_to_histogram(empty_histogram(), None, torch.tensor([1.0, float("nan"), float("inf"), 0.5]))
    assert float(hist.sum()) == 2 and top == 0


def test_histogram_needs_per_tensor_and_percentile_is_checked():
    with pytest.raises(ValueError, match="per tensor"):
        QuantSpec(observer="histogram", per_channel=True)
    with pytest.raises(ValueError, match="percentile"):
        QuantSpec(percentile=101)
    with pytest.raises(ValueError, match="percentile"):
        QuantSpec(percentile="high")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        t = self.a(x)
        return self.head(torch.cat([t, self.b(t)], 1))


def _calibrated_exponents(images: torch.Tensor, batch_size: int, order: torch.Tensor, spec: QuantSpec) -> dict:
    torch.manual_seed(0)
    model = prepare(_Net(), torch.zeros(1, 3, 16, 16), QuantConfig(activation=spec))
    shuffled = images[order]
    batches = [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
    calibrate(model, batches, n_images=len(images))
    return {name: q.exponent.clone() for name, q in iter_quantizers(model)}


@pytest.mark.parametrize("spec", [QuantSpec(observer="histogram", rounding="mse"),
                                  QuantSpec(observer="minmax", rounding="ceil")], ids=["hist_mse", "minmax"])
def test_calibration_does_not_depend_on_batch_order_or_size(spec):
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images[17] = 255  # one bright image: the range must not depend on when it is seen
    ref = _calibrated_exponents(images, 8, torch.arange(24), spec)
    for batch_size, seed in ((3, 0), (24, 1), (5, 2)):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(seed))
        got = _calibrated_exponents(images, batch_size, order, spec)
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), (name, batch_size, seed)


def test_ema_observer_depends_on_order_which_is_why_it_is_not_the_default():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 64, (24, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images[0] = 255
    spec = QuantSpec(observer="ema_minmax", rounding="round")
    first = _calibrated_exponents(images, 4, torch.arange(24), spec)
    last = _calibrated_exponents(images, 4, torch.arange(23, -1, -1), spec)
    assert any(not torch.equal(first[n], last[n]) for n in first)
