"""Pow2FakeQuantize: power-of-2 scales, rounding rules, observers, STE, state, autocast, DDP sync."""
from __future__ import annotations

import copy
import itertools
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from quant.config import QuantSpec
from quant.fake_quant import Pow2FakeQuantize


def make(signed=True, channels=1, **spec) -> Pow2FakeQuantize:
    fq = Pow2FakeQuantize(QuantSpec(**spec), signed=signed, num_channels=channels)
    return fq.train()


def assert_pow2(scale: torch.Tensor) -> None:
    assert scale.dtype == torch.float32
    log2 = torch.log2(scale)
    assert torch.equal(log2, log2.round()), scale


def data(signed: bool, channels: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, 3, 5, 5, generator=g) * torch.logspace(-2, 2, channels)[:, None, None, None]
    return x if signed else x.abs()


@pytest.mark.parametrize("rounding,per_channel,signed,bits",
                         list(itertools.product(["ceil", "round", "mse"], [False, True], [True, False], [4, 8, 16])))
def test_scales_are_exact_powers_of_two(rounding, per_channel, signed, bits):
    fq = make(signed, 4, bits=bits, rounding=rounding, per_channel=per_channel)
    x = data(signed)
    y = fq(x)
    assert fq.calibrated.item() == 1
    assert fq.scale().shape == ((4,) if per_channel else (1,))
    assert_pow2(fq.scale())
    assert torch.equal(fq.exponent, fq.exponent.round())
    # Outputs are integer multiples of the scale inside the representable range.
    scale = fq.scale().reshape(-1, 1, 1, 1) if per_channel else fq.scale()
    codes = y / scale
    assert torch.equal(codes, codes.round())
    assert codes.min() >= fq.quant_min and codes.max() <= fq.quant_max
    assert (fq.quant_min, fq.quant_max) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1))


def test_scale_formula_and_rules():
    x = torch.tensor([0.3, -5.0, 2.0])  # max|x| = 5: log2 5 = 2.32
    fq = make(rounding="ceil"); fq(x)
    assert fq.exponent.item() == 3 and fq.scale().item() == 2.0 ** 3 / 2 ** 7
    fq = make(rounding="round"); fq(x)
    assert fq.exponent.item() == 2
    fq = make(signed=False, rounding="ceil"); fq(x.abs())
    assert fq.scale().item() == 2.0 ** 3 / 2 ** 8


@pytest.mark.parametrize("per_channel", [False, True])
def test_ceil_keeps_max_round_may_clip(per_channel):
    x = data(True) * 1.37
    fq = make(True, 4, rounding="ceil", per_channel=per_channel)
    y = fq(x)
    dims = (1, 2, 3) if per_channel else (0, 1, 2, 3)
    scale = fq.scale()
    m = x.abs().amax(dim=dims)
    assert torch.all((y.abs().amax(dim=dims) - m).abs() <= scale)  # the max survives within a step
    assert torch.all((fq.quant_max * scale) >= m - scale)
    # 1.4 * 2^k: round(log2) = k, so the top values clip to ~2^k.
    z = torch.tensor([1.4, -0.2, 0.7, 0.01])
    fq = make(rounding="round")
    out = fq(z)
    assert fq.exponent.item() == 0 and out.max().item() < 1.0
    assert fq.clipping_ratio(z) == pytest.approx(0.25)


def brute_force_exponent(x: torch.Tensor, signed: bool, per_channel: bool, bits: int = 8) -> torch.Tensor:
    """Evaluate every candidate k with the fixed-exponent quantizer (the real op) and take argmin."""
    dims = tuple(range(1, x.dim())) if per_channel else tuple(range(x.dim()))
    m = x.abs().amax(dim=dims) if signed else x.amax(dim=dims)
    top = torch.ceil(torch.log2(m.double())).reshape(-1)
    best = []
    for c in range(top.numel()):
        errs = {}
        for k in range(int(top[c]) - 4, int(top[c]) + 1):
            fq = Pow2FakeQuantize(QuantSpec(bits=bits, fixed_exponent=k), signed=signed)
            xc = x[c] if per_channel else x
            errs[k] = float((fq(xc) - xc).pow(2).mean())
        best.append(min(errs, key=lambda k: (errs[k], k)))
    return torch.tensor(best, dtype=torch.float32)


@pytest.mark.parametrize("per_channel,signed,bits",
                         [(False, True, 8), (True, True, 8), (True, False, 4), (False, False, 4)])
def test_mse_picks_min_error_exponent(per_channel, signed, bits):
    g = torch.Generator().manual_seed(3)
    # One value per channel just above a power of two: ceil doubles the step for it, the
    # min-error k clips it slightly instead (and brute force must agree on which is better).
    sigma = torch.tensor([0.05, 1.0, 3.0, 40.0]) if per_channel else torch.full((4,), 1.0)
    x = torch.randn(4, 2, 8, 8, generator=g).clamp(-3, 3) * sigma[:, None, None, None]
    x[:, 0, 0, 0] = 4.1 * sigma
    x = x if signed else x.abs()
    fq = make(signed, 4, bits=bits, rounding="mse", per_channel=per_channel)
    fq(x)
    expected = brute_force_exponent(x, signed, per_channel, bits)
    assert torch.equal(fq.exponent, expected)
    ceil = make(signed, 4, bits=bits, rounding="ceil", per_channel=per_channel)
    ceil(x)
    assert torch.all(fq.exponent <= ceil.exponent) and torch.any(fq.exponent < ceil.exponent)


def test_mse_errors_follow_a_moving_window():
    fq = make(rounding="mse", averaging_constant=0.5)
    for scale in (1.0, 1.0, 64.0, 0.01, 3.0):
        fq(torch.randn(256) * scale)
        assert torch.isfinite(fq.mse_err).all()
        assert_pow2(fq.scale())
    assert fq.num_observed.item() == 5


def test_straight_through_gradient_inside_range_only():
    fq = make(rounding="round")
    fq(torch.tensor([1.0, -1.0]))  # k = 0: range [-1, 127/128]
    assert fq.exponent.item() == 0
    fq.eval()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.9, 2.0, 100.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    w = (torch.randn(3, 2, 2, 2) * 4).requires_grad_()
    fqc = make(True, 3, per_channel=True, rounding="round")
    fqc(w.detach() / 4)  # range sized for w/4: the larger values of w fall outside
    fqc(w).sum().backward()
    inside = (w.detach() >= fqc.quant_min * fqc.scale()[:, None, None, None] - 1e-6) & \
             (w.detach() <= fqc.quant_max * fqc.scale()[:, None, None, None])
    assert torch.equal(w.grad, inside.float())


def test_observers_respect_mode_and_flags():
    fq = make(rounding="ceil", observer="minmax")
    fq(torch.tensor([3.0]))
    assert fq.exponent.item() == 2
    fq.eval()
    fq(torch.tensor([100.0]))
    assert fq.exponent.item() == 2 and fq.max_val.item() == 3.0     # eval: no update
    fq.calibrating = True
    fq(torch.tensor([100.0]))
    assert fq.exponent.item() == 7                                   # calibrating: updates
    fq.calibrating = False
    fq.train()
    fq.enable_observer(False)
    fq(torch.tensor([1000.0]))
    assert fq.exponent.item() == 7 and fq.observer_enabled.item() == 0
    fq.enable_fake_quant(False)
    x = torch.tensor([0.123456, 500.0])
    assert torch.equal(fq(x), x)
    fq.enable_fake_quant(True)
    assert not torch.equal(fq(x), x)


def test_uncalibrated_passes_through():
    fq = make()
    fq.eval()
    x = torch.randn(10)
    assert torch.equal(fq(x), x) and fq.calibrated.item() == 0
    assert fq.clipping_ratio(x) == 0.0
    assert "uncalibrated" in repr(fq)


def test_observer_kinds():
    first, second = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])
    ema = make(observer="ema_minmax", averaging_constant=0.25)
    ema(first); ema(second)
    assert ema.min_val.item() == pytest.approx(-1.0 + 0.25 * (-3.0 + 1.0))
    assert ema.max_val.item() == pytest.approx(2.0 + 0.25 * (1.0 - 2.0))
    run = make(observer="minmax")
    run(first); run(second)
    assert (run.min_val.item(), run.max_val.item()) == (-3.0, 2.0)
    cur = make(observer="current")
    cur(first); cur(second)
    assert (cur.min_val.item(), cur.max_val.item()) == (-3.0, 1.0)
    run.reset_observer()
    run(torch.tensor([0.5]))
    assert (run.min_val.item(), run.max_val.item()) == (0.5, 0.5)


@pytest.mark.parametrize("rounding,per_channel,signed", list(itertools.product(["ceil", "round"], [False, True],
                                                                                   [True, False])))
def test_current_observer_is_a_minmax_observer_reset_each_step(rounding, per_channel, signed):
    """The 'current' observer's short path: each step (begin_step, then one or more calls, as a shared
    quantizer gets) leaves what a 'minmax' observer reset before that step leaves, fake-quant outputs
    included; a call outside a step replaces the range."""
    spec = dict(rounding=rounding, per_channel=per_channel)
    cur, ref = make(signed, 4, observer="current", **spec), make(signed, 4, observer="minmax", **spec)
    for step, calls in enumerate([1, 3, 2, 1]):
        cur.begin_step(), ref.begin_step(), ref.reset_observer()
        for call in range(calls):
            x = data(signed, seed=10 * step + call) * (0.5 + call)
            assert torch.equal(cur(x), ref(x)), (step, call)
        for name in ("exponent", "min_val", "max_val", "calibrated"):
            assert torch.equal(getattr(cur, name), getattr(ref, name)), (step, name)
    assert cur.num_observed.item() == 7
    cur._aggregate = False  # outside a step (a deep copy made before any forward)
    small = data(signed, seed=99) * 1e-3
    cur(small)
    assert torch.equal(cur.max_val, small.reshape(4, -1).amax(1) if per_channel else small.max().reshape(1))


def test_fixed_exponent_disables_observer():
    fq = make(signed=False, fixed_exponent=0)
    assert fq.observer_enabled.item() == 0 and fq.calibrated.item() == 1
    assert fq.scale().item() == 1 / 256
    fq.enable_observer(True)
    assert fq.observer_enabled.item() == 0
    y = fq(torch.tensor([0.0, 0.5, 1.0, 7.0]))
    assert fq.exponent.item() == 0
    assert y.tolist() == [0.0, 0.5, 255 / 256, 255 / 256]
    assert repr(fq).endswith("(uint8, scale 2^-8 (fixed))")
    head = make(signed=True, fixed_exponent=4)
    assert head.scale().item() == 1 / 8 and "int8, scale 2^-3 (fixed)" in repr(head)


def test_state_dict_round_trip():
    src = make(True, 4, rounding="mse", per_channel=True)
    x = data(True)
    src(x); src(x * 0.5)
    dst = make(True, 4, rounding="mse", per_channel=True)
    dst.load_state_dict(src.state_dict())
    src.eval(); dst.eval()
    assert torch.equal(src(x), dst(x))
    assert set(src.state_dict()) >= {"exponent", "min_val", "max_val", "mse_err", "observer_enabled",
                                     "fake_quant_enabled", "calibrated"}
    assert "per-channel" in repr(dst) and "mse" in repr(dst)


def test_deepcopy_and_sync_without_process_group():
    fq = make(rounding="mse")
    fq(torch.randn(50))
    before = fq.exponent.clone()
    fq.sync_across_ranks()  # no process group: nothing to do
    twin = copy.deepcopy(fq)
    assert torch.equal(twin.exponent, before) and twin.exponent.data_ptr() != fq.exponent.data_ptr()


def test_autocast_bfloat16_keeps_dtype():
    fq = make(rounding="round")
    x = torch.randn(2, 3, 4, 4)
    fq(x)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(xb)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fq(xb.float()).bfloat16())


def test_channel_mismatch_raises():
    fq = make(True, 4, per_channel=True)
    with pytest.raises(ValueError, match="expected 4 channels"):
        fq(torch.randn(3, 2))


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a failed rank fails the test, not hangs it
    try:
        torch.manual_seed(rank)
        quantizers = {
            "tensor_round": Pow2FakeQuantize(QuantSpec(rounding="round"), signed=True),
            "tensor_mse": Pow2FakeQuantize(QuantSpec(rounding="mse"), signed=True),
            "channel_mse": Pow2FakeQuantize(QuantSpec(rounding="mse", per_channel=True), signed=True, num_channels=3),
            "tensor_hist": Pow2FakeQuantize(QuantSpec(observer="histogram", rounding="mse"), signed=True),
        }
        for fq in quantizers.values():
            fq.train()
            fq(torch.randn(3, 64) * (1 + 30 * rank))  # the ranks see very different ranges
            fq.sync_across_ranks()
        state = {k: (q.exponent, q.min_val, q.max_val, q.mse_err) for k, q in quantizers.items()}
        state["histogram"] = (quantizers["tensor_hist"]._histogram.hist, torch.tensor(quantizers["tensor_hist"]._histogram.top))
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_across_ranks_gloo(tmp_path):
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in r0:
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    assert r0["tensor_round"][2].item() > 20  # the max came from rank 1
    # The summed histogram is the one a single quantizer builds from both ranks' data.
    alone = Pow2FakeQuantize(QuantSpec(observer="histogram", rounding="mse"), signed=True).train()
    for rank in (0, 1):
        torch.manual_seed(rank)
        for _ in range(3):  # the worker drew three tensors before the histogram quantizer's
            torch.randn(3, 64)
        alone(torch.randn(3, 64) * (1 + 30 * rank))
    assert torch.equal(r0["histogram"][0], alone._histogram.hist) and int(r0["histogram"][1]) == alone._histogram.top
    assert torch.equal(r0["tensor_hist"][0], alone.exponent)


def test_ceil_exponent_on_the_host_equals_the_device_rule():
    """The histogram observer's host-side ceil(log2 bound) gives exponent_from_bound's value: at powers of two,
    one float32 step either side of them, the clamps, zero and the infinities."""
    from quant.fq_ops import EXP_MAX, ceil_exponent, exponent_from_bound

    powers = torch.tensor([2.0 ** k for k in range(-60, 60)], dtype=torch.float32)
    bounds = torch.cat([powers, torch.nextafter(powers, powers * 2), torch.nextafter(powers, powers / 2),
                        torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 1000,
                        torch.tensor([0.0, -3.0, 3.4e38, 1e-45, float("inf")])])
    want = exponent_from_bound(bounds, "ceil")
    got = torch.tensor([float(ceil_exponent(float(b))) for b in bounds])
    assert torch.equal(got, want), bounds[got != want]
    assert ceil_exponent(float("inf")) == EXP_MAX
    with pytest.raises(ValueError, match="NaN"):
        ceil_exponent(float("nan"))
