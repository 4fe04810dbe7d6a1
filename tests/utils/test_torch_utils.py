"""Tests for utils.torch_utils: device choice, seeding, EMA, optimizer groups, LR lambdas, early stop."""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.torch_utils import (EarlyStopping, ModelEMA, de_parallel, init_seeds, intersect_dicts, is_parallel,
                               linear_lr, one_cycle, select_device, smart_inference_mode, smart_optimizer,
                               time_sync)


def tiny_net() -> nn.Sequential:
    """Conv(bias=False)-BN-SiLU, Conv(bias=False)-BN-SiLU, then a 1x1 conv with bias (like a head)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Conv2d(4, 6, 1),
    )


# ---- devices -------------------------------------------------------------------------------------------
def test_select_device_cpu():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_select_device_default_without_cuda():
    assert select_device("") == torch.device("cpu")
    assert select_device(None) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["99", "0,99", "cuda:99", "gpu"])
def test_select_device_bad_id(bad):
    with pytest.raises(ValueError, match="--device"):
        select_device(bad)


def test_select_device_does_not_touch_env(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    select_device("cpu")
    with pytest.raises(ValueError):
        select_device("99")
    import os
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


# ---- seeding -------------------------------------------------------------------------------------------
def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_init_seeds_reproducible():
    init_seeds(7)
    a = _draws()
    init_seeds(7)
    assert _draws() == a
    init_seeds(8)
    assert _draws() != a


def test_init_seeds_deterministic_flag():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        init_seeds(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


# ---- small helpers -------------------------------------------------------------------------------------
def test_parallel_helpers_and_time_sync():
    net = tiny_net()
    dp = nn.DataParallel(net)
    assert is_parallel(dp) and not is_parallel(net)
    assert de_parallel(dp) is net and de_parallel(net) is net
    t0 = time_sync()
    assert time_sync() >= t0


def test_smart_inference_mode():
    @smart_inference_mode()
    def f(x):
        return x * 2

    y = f(torch.ones(2, requires_grad=True))
    assert y.is_inference() and not y.requires_grad


def test_intersect_dicts():
    da = {"a": torch.zeros(2), "b": torch.zeros(3), "anchors": torch.zeros(2), "c": torch.zeros(1)}
    db = {"a": torch.ones(2), "b": torch.ones(4), "anchors": torch.ones(2)}
    assert set(intersect_dicts(da, db, exclude=("anch",))) == {"a"}
    assert set(intersect_dicts(da, db)) == {"a", "anchors"}


# ---- EMA -----------------------------------------------------------------------------------------------
def test_ema_is_frozen_eval_copy():
    net = tiny_net().train()
    ema = ModelEMA(net)
    assert not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert ema.ema[0].weight.data_ptr() != net[0].weight.data_ptr()


def test_ema_decay_ramp():
    ema = ModelEMA(tiny_net(), decay=0.9999, tau=2000)
    assert ema.decay(0) == 0.0
    assert ema.decay(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema.decay(10**6) == pytest.approx(0.9999)
    assert ema.decay(10) < ema.decay(100) < ema.decay(1000)


def test_ema_update_formula_params_and_buffers():
    torch.manual_seed(0)
    net = tiny_net()
    ema = ModelEMA(net, decay=0.9, tau=1.0, updates=3)
    start = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():  # move the model: weights and BN running stats
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
        net[1].num_batches_tracked.fill_(5)
    ema.update(net)
    assert ema.updates == 4
    d = 0.9 * (1 - math.exp(-4))
    msd, esd = net.state_dict(), ema.ema.state_dict()
    for k in ("0.weight", "1.weight", "1.running_mean", "6.bias"):
        expected = start[k] * d + (1 - d) * msd[k]
        torch.testing.assert_close(esd[k], expected)
        assert not torch.equal(esd[k], start[k])  # moved toward the model
    assert int(esd["1.num_batches_tracked"]) == 5  # integer buffers copied as is


def test_ema_converges_toward_model():
    net = tiny_net()
    ema = ModelEMA(net, decay=0.5, tau=1e-6)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    gaps = []
    for _ in range(5):
        ema.update(net)
        gaps.append(float((ema.ema[0].weight - net[0].weight).detach().abs().max()))
    assert all(b < a for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 0.05


class WithScale(nn.Module):
    """A module with extra buffers, standing in for a QAT quantizer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("exponent", torch.tensor(-3, dtype=torch.int32))
        self.register_buffer("frozen", torch.tensor(False))

    def forward(self, x):
        return x * self.scale


def test_ema_carries_extra_buffers():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), WithScale())
    ema = ModelEMA(net, decay=0.0, tau=1.0)  # d = 0: the EMA becomes a copy of the model
    net[1].scale.fill_(0.25)
    net[1].exponent.fill_(-2)
    net[1].frozen.fill_(True)
    ema.update(net)
    assert float(ema.ema[1].scale) == 0.25
    assert int(ema.ema[1].exponent) == -2 and bool(ema.ema[1].frozen)


def test_ema_rebuilds_when_model_gains_modules(caplog):
    net = nn.Sequential(nn.Conv2d(3, 3, 1))
    ema = ModelEMA(net, decay=0.9, tau=1.0)
    with torch.no_grad():
        ema.ema[0].weight.fill_(3.0)  # a distinct averaged value that must survive the rebuild
    net.append(WithScale())
    with caplog.at_level("WARNING", logger="utils.torch_utils"):
        ema.update(net)
    assert "rebuilt" in caplog.text
    assert isinstance(ema.ema[1], WithScale) and not ema.ema.training
    assert all(not p.requires_grad for p in ema.ema.parameters())
    d = ema.decay(1)
    torch.testing.assert_close(ema.ema[0].weight, 3.0 * d + (1 - d) * net[0].weight)
    assert ema.ema[0].weight.data_ptr() != net[0].weight.data_ptr()


def test_ema_update_attr():
    net = tiny_net()
    net.names, net.nc, net.stride, net.other = ["a"], 1, torch.tensor([8.0]), "x"
    ema = ModelEMA(net)
    net.names, net.nc, net.other = ["a", "b"], 2, "y"
    ema.update_attr(net)
    assert ema.ema.names == ["a", "b"] and ema.ema.nc == 2
    assert ema.ema.other == "x"  # not in include
    ema.update_attr(net, include=("names", "other"), exclude=("other",))
    assert ema.ema.other == "x"


# ---- optimizer -----------------------------------------------------------------------------------------
def test_smart_optimizer_groups():
    net = tiny_net()
    opt = smart_optimizer(net, "SGD", lr=0.01, momentum=0.937, decay=5e-4)
    g = opt.param_groups
    # group 0: 2 BN biases + head bias; group 1: 3 conv weights; group 2: 2 BN weights
    assert [len(x["params"]) for x in g] == [3, 3, 2]
    assert [x["weight_decay"] for x in g] == [0.0, 5e-4, 0.0]
    assert all(x["lr"] == 0.01 and x["momentum"] == 0.937 and x["nesterov"] for x in g)


def test_smart_optimizer_group_membership():
    net = tiny_net()
    g = smart_optimizer(net, "SGD").param_groups
    ids = [{id(p) for p in x["params"]} for x in g]
    assert ids[0] == {id(net[1].bias), id(net[4].bias), id(net[6].bias)}
    assert ids[1] == {id(net[0].weight), id(net[3].weight), id(net[6].weight)}
    assert ids[2] == {id(net[1].weight), id(net[4].weight)}


def test_smart_optimizer_extra_params_get_no_decay():
    net = tiny_net()
    net.log2_scale = nn.Parameter(torch.zeros(()))
    g = smart_optimizer(net, "SGD", decay=1e-3).param_groups
    assert any(p is net.log2_scale for p in g[2]["params"])


@pytest.mark.parametrize("name,cls", [("Adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW),
                                      ("RMSProp", torch.optim.RMSprop)])
def test_smart_optimizer_kinds(name, cls):
    net = tiny_net()
    opt = smart_optimizer(net, name, lr=0.001, momentum=0.9, decay=1e-5)
    assert isinstance(opt, cls)
    if name != "RMSProp":
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert [x["weight_decay"] for x in opt.param_groups] == [0.0, 1e-5, 0.0]
    net(torch.rand(1, 3, 8, 8)).sum().backward()
    opt.step()  # foreach path runs on CPU


def test_smart_optimizer_unknown():
    with pytest.raises(ValueError, match="Lion"):
        smart_optimizer(tiny_net(), "Lion")


# ---- LR lambdas and early stopping ---------------------------------------------------------------------
def test_lr_lambdas():
    lf = one_cycle(1, 0.01, 100)
    assert lf(0) == pytest.approx(1.0) and lf(100) == pytest.approx(0.01)
    assert lf(50) == pytest.approx((1 + 0.01) / 2)
    lin = linear_lr(0.01, 300)
    assert lin(0) == pytest.approx(1.0) and lin(300) == pytest.approx(0.01)
    assert lin(150) == pytest.approx(0.505)
    assert pickle.loads(pickle.dumps(lin))(150) == lin(150)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lin)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lin(1))
    sched.load_state_dict(sched.state_dict())


def test_early_stopping(caplog):
    stopper = EarlyStopping(patience=3)
    fits = [0.1, 0.2, 0.15, 0.18, 0.19]  # best at epoch 1; epochs 2, 3 no better
    assert not any(stopper(e, f) for e, f in enumerate(fits[:4]))
    assert stopper.best_epoch == 1 and stopper.possible_stop
    with caplog.at_level("INFO", logger="utils.torch_utils"):
        assert stopper(4, fits[4])
    assert "epoch 1" in caplog.text


def test_early_stopping_disabled_and_ties():
    stopper = EarlyStopping(patience=0)
    assert not any(stopper(e, 0.0) for e in range(100))
    tie = EarlyStopping(patience=2)
    assert not any(tie(e, 0.0) for e in range(10))  # equal fitness counts as improvement


def test_keep_freed_memory_sets_glibc_malloc_once_on_cpu_only():
    """A fresh process: a CUDA device leaves malloc alone; the CPU device sets it (this Linux runs glibc)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import torch; from utils.torch_utils import keep_freed_memory as k; "
            "print(k(torch.device('cuda')), k(torch.device('cpu')), k(torch.device('cpu')), k(torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out == ["False", "True", "True", "True"]
