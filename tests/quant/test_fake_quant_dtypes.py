"""Autocast activations (bf16/fp16) are fake-quantized in their own dtype: values, gradients and observed
ranges equal the float32 route exactly; a build without the kernel is found out by a probe when the model is
prepared or moved, and then goes through float32 (never by catching a failure inside forward)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import quant.fq_ops as fq_ops
from quant.config import QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.fq_ops import PerTensorFakeQuantCPU, has_half_kernel, probe_half_kernels


def _quantizer(signed: bool, bits: int = 8) -> Pow2FakeQuantize:
    q = Pow2FakeQuantize(QuantSpec(bits=bits), signed=signed).train()
    q(torch.linspace(-3.0, 5.0, 101) if signed else torch.linspace(0.0, 5.0, 101))  # calibrate: 2^3 range
    q.enable_observer(False)
    return q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("signed", [True, False])
def test_reduced_precision_matches_float32_route(dtype, signed):
    q = _quantizer(signed)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 16, 16, generator=gen) * 4).to(dtype)  # includes values beyond the 8.0 range
    x = x.contiguous(memory_format=torch.channels_last)
    probe_half_kernels("cpu")
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    native = q(a)
    via_float = q._fake_quant_op(b.float(), q.scale()).to(dtype)
    assert native.dtype == dtype and torch.equal(native, via_float)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    native.backward(g)
    via_float.backward(g)
    assert torch.equal(a.grad, b.grad)  # straight-through inside the range, zero outside
    assert (a.grad == 0).any() and (a.grad != 0).any()


def test_observed_range_is_the_same_in_every_dtype():
    x = torch.randn(2, 4, 8, 8) * 3
    ranges = []
    for dtype in (torch.float32, torch.bfloat16):
        q = Pow2FakeQuantize(QuantSpec(bits=8), signed=True).train()
        q(x.to(dtype).contiguous(memory_format=torch.channels_last))
        ranges.append((q.min_val.clone(), q.max_val.clone(), q.exponent.clone()))
    expected = x.to(torch.bfloat16).float()
    assert torch.equal(ranges[1][0], expected.min().reshape(1)) and torch.equal(ranges[1][1], expected.max().reshape(1))
    assert torch.equal(ranges[0][2], ranges[1][2])


def test_missing_kernel_is_probed_once_and_forward_goes_through_float32(monkeypatch):
    q = _quantizer(signed=True)
    real = torch.fake_quantize_per_tensor_affine
    calls = []

    def no_bf16(x, *args):
        calls.append(x.dtype)
        if x.dtype == torch.bfloat16:
            raise RuntimeError("\"fake_quantize_tensor_cachemask_kernel\" not implemented for 'BFloat16'")
        return real(x, *args)

    monkeypatch.setattr(torch, "fake_quantize_per_tensor_affine", no_bf16)
    monkeypatch.setattr(fq_ops, "_HALF_KERNELS", {})
    assert torch.bfloat16 not in probe_half_kernels("cpu")
    assert torch.float16 in probe_half_kernels("cpu")  # remembered: no second probe
    assert calls == [torch.bfloat16, torch.float16]
    x = torch.randn(64).to(torch.bfloat16)
    assert not has_half_kernel(x)
    first, second = q(x), q(x)
    assert first.dtype == second.dtype == torch.bfloat16 and torch.equal(first, second)
    assert torch.equal(first, q(x.float()).to(torch.bfloat16))
    assert calls == [torch.bfloat16, torch.float16]  # forward never tried the missing kernel


def test_preparing_a_model_probes_its_device():
    from quant.config import QuantConfig
    from quant.prepare import prepare
    from tests.tiny_nets import AddConcatNet

    fq_ops._HALF_KERNELS.pop("cpu", None)
    prepare(AddConcatNet(pool=True), (torch.rand(1, 3, 16, 16),), QuantConfig.from_dict({}))
    assert "cpu" in fq_ops._HALF_KERNELS


def _builtin_and(kernel, qmin: int, qmax: int, k: int):
    """(generator, builtin leaf, kernel leaf, builtin output, kernel output) on one input with NaN,
    infinities and exact .5 ties (3.984375 / 2^-5 = 127.5 rounds to even, out of range), scale 2^k."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(4, 8, 17, 19, generator=gen) * 5
    x[0, 0, 0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.984375, -0.5 * 2.0 ** k])
    scale = torch.tensor([2.0 ** k])
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    builtin = torch.fake_quantize_per_tensor_affine(a, scale, torch.zeros(1, dtype=torch.int32), qmin, qmax)
    return gen, a, b, builtin, kernel.apply(b, scale, qmin, qmax)


@pytest.mark.parametrize("qmin,qmax,k", [(-128, 127, -5), (0, 255, -6), (-8, 7, -1)])
def test_cpu_per_tensor_kernel_equals_the_builtin(qmin, qmax, k):
    gen, a, b, builtin, ours = _builtin_and(PerTensorFakeQuantCPU, qmin, qmax, k)
    assert torch.equal(builtin, ours)
    g = torch.randn(a.shape, generator=gen)
    g[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")])  # on clipped values: 0 * inf
    builtin.backward(g)
    ours.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)  # the builtin's dY * mask


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (-128, 127), (-8, 7), (0, 15), (-1, 0), (-2, 1)])
@pytest.mark.parametrize("k", [-12, -5, 0, 3])
def test_kept_range_is_the_builtin_mask_at_every_tie(qmin, qmax, k):
    """hardtanh_backward with kept_range's open bounds keeps exactly the values the builtin's mask keeps:
    the float32 values at, just below and just above each half-step tie and integer step at both ends of
    the range, both infinities, and random values."""
    s = 2.0 ** k
    edges = []
    for q in (qmin, qmax):
        for d in (-1.0, -0.5, 0.0, 0.5, 1.0):
            v = np.float32((q + d) * s)
            edges += [v, np.nextafter(v, np.float32(-np.inf)), np.nextafter(v, np.float32(np.inf))]
    gen = torch.Generator().manual_seed(k - qmin)
    x = torch.cat([torch.from_numpy(np.array(edges, np.float32)), torch.randn(500, generator=gen) * s * (qmax - qmin),
                   torch.tensor([float("inf"), -float("inf")])])
    leaf = x.clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(leaf, torch.tensor([s]), torch.zeros(1, dtype=torch.int32), qmin,
                                          qmax).sum().backward()
    ours = torch.ops.aten.hardtanh_backward(torch.ones_like(x), x, *fq_ops.kept_range(s, qmin, qmax))
    assert torch.equal(leaf.grad, ours)


@pytest.mark.parametrize("qmin,qmax,k", [(-128, 127, -5), (0, 255, -6), (-8, 7, -1)])
def test_eager_cpu_kernel_equals_the_builtin_but_for_non_finite_gradients(qmin, qmax, k):
    """RangeMaskFakeQuantCPU (what eager training runs on the CPU): the builtin's values, NaN and ties
    included, and its gradient wherever the gradient is finite, NaN inputs included (0). The one
    difference, as documented: a non-finite gradient on a clipped value gives 0 (the builtin 0 * inf = NaN)."""
    gen, a, b, builtin, ours = _builtin_and(fq_ops.RangeMaskFakeQuantCPU, qmin, qmax, k)
    assert torch.equal(builtin, ours)
    g = torch.randn(a.shape, generator=gen)
    g[0, 0, 0, 1:3] = torch.tensor([float("inf"), float("nan")])  # on the clipped infinities
    builtin.backward(g)
    ours.backward(g)
    assert torch.equal(a.grad.flatten()[3:], b.grad.flatten()[3:])
    assert a.grad[0, 0, 0, 0] == b.grad[0, 0, 0, 0] == 0  # the NaN input
    assert a.grad[0, 0, 0, 1:3].isnan().all() and (b.grad[0, 0, 0, 1:3] == 0).all()


def _grad_of(fn, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad, type(y.grad_fn).__name__


@pytest.mark.parametrize("kind", ["per-tensor", "relu folded", "per-channel"])
def test_quantizer_runs_the_range_mask_kernels_as_library_ops_under_compile(kind, monkeypatch):
    """Pow2FakeQuantize on a float32 CPU tensor: the range-mask autograd Functions in eager mode; while
    torch.compile traces, the same kernels as pow2q:: library ops (opaque to inductor), with the same
    values and gradients bit for bit, rounding ties and values outside the range included."""
    from quant.config import QuantSpec
    from quant.fake_quant import Pow2FakeQuantize

    per_channel = kind == "per-channel"
    fq = Pow2FakeQuantize(QuantSpec(bits=8, per_channel=per_channel, ch_axis=0), signed=per_channel,
                          num_channels=3 if per_channel else 1)
    fq.train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=gen) * 4
    fq(x)  # observe once, then freeze
    fq.enable_observer(False)
    scale = float(fq.scale().max())
    x.view(-1)[:4] = torch.tensor([127.5, 128.5, -0.5, 255.5]) * scale  # exact ties
    g = torch.randn(x.shape, generator=gen)
    run = fq.fake_quant_after_relu if kind == "relu folded" else fq
    eager = _grad_of(run, x, g)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = _grad_of(run, x, g)
    assert "pow2q" in traced[2] and "pow2q" not in eager[2]
    assert torch.equal(eager[0], traced[0]) and torch.equal(eager[1], traced[1])
    assert 0 < int((eager[1] == 0).sum()) < x.numel()  # some values clipped, some kept


def test_compile_traces_the_float_mask_kernels_where_torch_has_no_library_ops(monkeypatch):
    """Before torch 2.4 (no torch.library.custom_op) the quantizer still works under torch.compile: it traces
    PerTensorFakeQuantCPU, the builtin per-channel kernel, and a separate ReLU; same values as eager."""
    import quant.fake_quant as fake_quant
    from quant.config import QuantSpec

    monkeypatch.setattr(fake_quant, "compiled_fake_quant", None)
    monkeypatch.setattr(fake_quant, "compiled_channel_fake_quant", None)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 4
    g = torch.ones_like(x)
    for per_channel in (False, True):
        fq = fake_quant.Pow2FakeQuantize(QuantSpec(bits=8, per_channel=per_channel, ch_axis=0), signed=per_channel,
                                         num_channels=3 if per_channel else 1)
        fq.train()
        fq(x)
        fq.enable_observer(False)
        run = fq if per_channel else fq.fake_quant_after_relu
        eager = _grad_of(run, x, g)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            traced = _grad_of(run, x, g)
        expected = "FakeQuantizePerChannelAffine" if per_channel else "PerTensorFakeQuantCPUBackward"
        assert expected in traced[2] and torch.equal(eager[0], traced[0])


def test_library_ops_register_consistently():
    """torch.library's own check of the pow2q ops: fake (meta) kernels, autograd registration and
    schema agree with what the kernels do."""
    from quant.fq_ops import compiled_channel_fake_quant, compiled_fake_quant

    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    torch.library.opcheck(compiled_fake_quant, (x, torch.tensor([2.0 ** -4]), -128, 127, False))
    torch.library.opcheck(compiled_fake_quant, (x, torch.tensor([2.0 ** -4]), 0, 255, True))
    scale = torch.tensor([2.0 ** -3, 2.0 ** -5, 1.0]).reshape(1, 3, 1, 1)
    torch.library.opcheck(compiled_channel_fake_quant, (x, scale, -128, 127))


@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (-8, 7), (0, 255)])
def test_eager_cpu_channel_kernel_equals_the_builtin(qmin, qmax):
    """ChannelRangeMaskFakeQuantCPU (eager CPU weights): the builtin per-channel kernel's values and
    gradient on a conv weight with a power-of-2 scale per output channel, exact ties, NaN and -inf
    included; +inf is the one documented difference (qmax here, the builtin's integer cast gives qmin)."""
    gen = torch.Generator().manual_seed(qmax)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    exps = torch.tensor([-7.0, -5.0, -9.0, 0.0, -3.0, -40.0])
    scale = torch.pow(2.0, exps)
    w[0, 0, 0, :3] = torch.tensor([float("nan"), -float("inf"), (qmax + 0.5) * 2.0 ** -7])
    w[1, 0, 0, :2] = torch.tensor([(qmin - 0.5) * 2.0 ** -5, (qmax - 0.5) * 2.0 ** -5])
    w[5] = 0.0  # an all-zero channel, tiny scale
    a, b = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    builtin = torch.fake_quantize_per_channel_affine(a, scale, torch.zeros(6, dtype=torch.int32), 0, qmin, qmax)
    ours = fq_ops.ChannelRangeMaskFakeQuantCPU.apply(b, scale.reshape(-1, 1, 1, 1), qmin, qmax)
    assert torch.equal(builtin, ours)
    g = torch.randn(w.shape, generator=gen)
    builtin.backward(g)
    ours.backward(g)
    assert torch.equal(a.grad, b.grad) and (b.grad[0, 0, 0, :3] == 0).all()
    plus_inf = fq_ops.ChannelRangeMaskFakeQuantCPU.apply(torch.full((1, 2), float("inf")), torch.ones(1, 1), qmin, qmax)
    assert (plus_inf == qmax).all()


def test_per_channel_quantizer_runs_the_eager_channel_kernel():
    fq = Pow2FakeQuantize(QuantSpec(bits=8, per_channel=True, observer="current"), signed=True, num_channels=4)
    fq.train()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = fq(w)
    assert type(y.grad_fn).__name__ == "ChannelRangeMaskFakeQuantCPUBackward"
    ref = torch.fake_quantize_per_channel_affine(w.detach(), fq.scale(), torch.zeros(4, dtype=torch.int32), 0, -128, 127)
    assert torch.equal(y.detach(), ref)


def test_relu_folded_kernel_equals_relu_then_quantizer():
    """ReluRangeMaskFakeQuantCPU(x) against RangeMaskFakeQuantCPU(relu(x)): the same values (up to the sign
    of zero) and the same gradient, at the ReLU's edge (0, tiny values either side) and at the top tie."""
    s = 2.0 ** -4
    x = torch.randn(2, 5, 9, 9, generator=torch.Generator().manual_seed(1)) * 8
    x.view(-1)[:7] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5 * s, 255.5 * s, float("nan")])
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    scale = torch.tensor([s])
    two_steps = fq_ops.RangeMaskFakeQuantCPU.apply(torch.relu(a), scale, 0, 255)
    folded = fq_ops.ReluRangeMaskFakeQuantCPU.apply(b, scale, 0, 255)
    assert torch.equal(two_steps, folded)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    two_steps.backward(g)
    folded.backward(g)
    assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="unsigned"):
        fq_ops.ReluRangeMaskFakeQuantCPU.apply(b, scale, -128, 127)
