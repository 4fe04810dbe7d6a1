"""Pow2FakeQuantize keeps Python copies of its flags: a QAT training step reads no device value back (on a
GPU each read is a stall), yet every way the state changes — load_state_dict, EMA copies, deepcopy, the
enable methods, an in-place write of the exponent, DDP's buffer broadcast — is seen at the next forward."""
from __future__ import annotations

import copy
import gc
from datetime import timedelta

import pytest
import torch

from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import Pow2FakeQuantize
from quant.schedule import set_observers
from tests.tiny_nets import AddConcatNet
from utils.torch_utils import ModelEMA


class HostReads:
    """Counts tensor -> Python conversions (bool, float, int, item, tolist) while active."""

    NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return wrapper


class _BuiltinPerChannel:
    @staticmethod
    def apply(x, scale, qmin, qmax):
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), torch.zeros(scale.numel(), dtype=torch.int32),
                                                      0, qmin, qmax)


@pytest.fixture
def device_kernels(monkeypatch):
    """The fake-quant kernels a GPU runs (the builtin per-channel one; per tensor, the traceable
    PerTensorFakeQuantCPU, which reads nothing either). The eager CPU kernels read their scale on the host:
    a CPU tensor, so no stall, and never used for device tensors."""
    import quant.fake_quant as fake_quant
    from quant.fq_ops import PerTensorFakeQuantCPU

    monkeypatch.setattr(fake_quant, "RangeMaskFakeQuantCPU", PerTensorFakeQuantCPU)
    monkeypatch.setattr(fake_quant, "ChannelRangeMaskFakeQuantCPU", _BuiltinPerChannel)


def _prepared(rounding: str = "ceil", observer: str = "ema_minmax"):
    from quant.prepare import prepare

    torch.manual_seed(0)
    config = {"activation": {"rounding": rounding, "observer": observer},
              "weight": {"rounding": rounding, "observer": observer}}
    return prepare(AddConcatNet(pool=True), (torch.rand(2, 3, 16, 16),), QuantConfig.from_dict(config)).train()


def _train_step(model, opt, x):
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("rounding,observer", [("ceil", "ema_minmax"), ("mse", "minmax"), ("round", "current")])
def test_training_steps_read_nothing_back(monkeypatch, device_kernels, rounding, observer):
    model = _prepared(rounding, observer)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(2, 3, 16, 16)
    _train_step(model, opt, x)  # first step: flags change (calibrated 0 -> 1) and are read once
    _train_step(model, opt, x)
    reads = HostReads(monkeypatch)
    for _ in range(2):
        _train_step(model, opt, x)  # observers on: statistics and exponents update on the device
    assert reads.count == 0
    set_observers(model, False)
    _train_step(model, opt, x)  # the flag changed: one read per quantizer, then none
    reads.count = 0
    _train_step(model, opt, x)
    model.eval()
    with torch.no_grad():
        model(x)
    assert reads.count == 0


def test_in_place_exponent_writes_are_used_at_once():
    fq = Pow2FakeQuantize(QuantSpec(bits=8), signed=True)
    fq.train()
    x = torch.randn(64)
    fq(x)
    fq.enable_observer(False)
    first = fq.scale()
    with torch.no_grad():
        fq.exponent.data.add_(1)  # .data: no version bump, as DDP's broadcast writes
    assert torch.equal(fq.scale(), first * 2)
    assert torch.equal(fq(x), torch.fake_quantize_per_tensor_affine(x, float(first * 2), 0, -128, 127))


def test_state_changes_are_seen_after_caching():
    x = torch.randn(256)
    calibrated = Pow2FakeQuantize(QuantSpec(bits=4), signed=True).train()
    calibrated(x)
    fresh = Pow2FakeQuantize(QuantSpec(bits=4), signed=True).train()
    fresh.enable_observer(False)
    assert torch.equal(fresh(x), x) and not fresh.is_active()  # uncalibrated: identity, cached as such
    fresh.load_state_dict(calibrated.state_dict())
    assert fresh.is_active()
    assert torch.equal(fresh(x), calibrated(x))
    fresh.enable_fake_quant(False)
    assert torch.equal(fresh(x), x)
    clone = copy.deepcopy(calibrated).eval()
    assert torch.equal(clone(x), calibrated.eval()(x))


def test_ema_copy_turns_quantizers_on():
    model = _prepared()
    ema = ModelEMA(model)  # copied before calibration: its quantizers are inactive
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = ema.ema(x)
        model(x)  # train mode: calibrates the model's quantizers
        ema.update(model)
        after = ema.ema(x)
    quantizers = [m for m in ema.ema.modules() if isinstance(m, Pow2FakeQuantize)]
    assert quantizers and all(q.is_active() for q in quantizers)
    assert not torch.equal(before, after)
    trained = {n: m.exponent for n, m in model.named_modules() if isinstance(m, Pow2FakeQuantize)}
    copied = {n: m.exponent for n, m in ema.ema.named_modules() if isinstance(m, Pow2FakeQuantize)}
    assert trained.keys() == copied.keys()
    assert all(torch.equal(trained[n], copied[n]) for n in trained)


class _QuantizedLinear(torch.nn.Module):
    """A parameter (DDP needs one) feeding a frozen activation quantizer, hooked as prepare() hooks."""

    def __init__(self):
        super().__init__()
        from quant.schedule import begin_observation_step

        self.linear = torch.nn.Linear(4, 4)
        self.fq = Pow2FakeQuantize(QuantSpec(bits=8), signed=True)
        self.register_forward_pre_hook(begin_observation_step)

    def forward(self, x):
        return self.fq(self.linear(x))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # a failed rank fails the test, not hangs it
    try:
        torch.manual_seed(0)
        model = _QuantizedLinear().train()
        model.fq(torch.randn(64) * (1 + 100 * rank))  # ranks calibrate to different exponents
        model.fq.enable_observer(False)
        x = torch.randn(8, 4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        model(x)
        if rank == 0:
            with torch.no_grad():
                model.fq.exponent.add_(3)  # rank 0 moves on; DDP copies it over before the next forward
        out = ddp(x)
        torch.save({"exponent": model.fq.exponent.clone(), "out": out.detach()}, f"{out_dir}/rank{rank}.pt")
        # Let gloo's worker threads finish with DDP's tensors, then drop DDP while the group still exists.
        # Otherwise DDP's reducer may hold the group's last reference and destroy it at function exit: its
        # destructor joins those threads while holding the GIL, and a thread freeing a tensor waits for the
        # GIL (a deadlock seen twice in full-suite runs, in ProcessGroupGloo::~ProcessGroupGloo).
        dist.barrier()
        del ddp, out
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_broadcast_exponent_is_used(tmp_path):
    """DDP copies rank 0's exponent into the other ranks without bumping the version counter; the scale
    is computed from the exponent at each call, so every rank quantizes with the broadcast exponent."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["exponent"], r1["exponent"])
    assert torch.equal(r0["out"], r1["out"])
