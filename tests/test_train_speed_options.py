"""The training-speed options change no result: channels_last trains to the same weights as NCHW (to
float rounding), the fused SGD update and the multi-tensor EMA update are bit-identical to the
per-tensor ones, and --compile wraps only the training forward."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import train
from models.yolo import DetectionModel
from utils.data.synthetic import make_synthetic_dataset
from utils.torch_utils import ModelEMA, smart_optimizer, use_channels_last

BASE = dict(cfg="yolov5p.yaml", weights="", imgsz=64, batch_size=4, workers=0, device="cpu", epochs=1,
            noplots=True, noval=True, noautoanchor=True, seed=1)


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=8, n_val=4, img_size=64)


def _weights(run: Path) -> dict:
    return torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_channels_last_trains_to_the_same_weights(tmp_path, data_yaml):
    for fmt in ("contiguous", "channels_last"):
        train.run(**BASE, data=str(data_yaml), project=str(tmp_path), name=fmt, memory_format=fmt)
    nchw, nhwc = _weights(tmp_path / "contiguous"), _weights(tmp_path / "channels_last")
    assert nchw.keys() == nhwc.keys()
    layer0 = "model.0.conv.weight"  # a 6x6 kernel: the two layouts have different strides
    assert nhwc[layer0].is_contiguous(memory_format=torch.channels_last) and not nhwc[layer0].is_contiguous()
    assert nchw[layer0].is_contiguous()
    for k in nchw:
        assert torch.allclose(nchw[k].float(), nhwc[k].float(), rtol=1e-4, atol=1e-5), k


def test_memory_format_choice():
    assert use_channels_last("auto", torch.device("cuda", 0))
    assert not use_channels_last("auto", torch.device("cpu"))
    assert use_channels_last("channels_last", torch.device("cpu"))
    assert not use_channels_last("contiguous", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="--memory-format 'nhwc'"):
        use_channels_last("nhwc", torch.device("cpu"))


def _sgd_run(fused: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = DetectionModel("yolov5p.yaml", nc=3)
    opt = smart_optimizer(model, "SGD", lr=0.01, momentum=0.937, decay=5e-4)
    if not fused:  # the per-group multi-tensor update, as before fused kernels
        for group in opt.param_groups:
            group["fused"], group["foreach"] = False, True
    x = torch.rand(2, 3, 64, 64)
    for _ in range(3):
        sum(p.sum() for p in model(x)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_sgd_is_bit_identical():
    torch.manual_seed(0)
    opt = smart_optimizer(DetectionModel("yolov5p.yaml", nc=3), "SGD")
    assert all(g["fused"] for g in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(_sgd_run(True), _sgd_run(False)))


def test_multi_tensor_ema_rounds_like_the_loop():
    torch.manual_seed(0)
    model = DetectionModel("yolov5p.yaml", nc=3)
    ema = ModelEMA(model)
    reference = copy.deepcopy(ema.ema)
    model.model[0].bn.num_batches_tracked.fill_(7)  # integer state is copied, not averaged
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            for b in model.buffers():
                if b.dtype.is_floating_point:
                    b.add_(0.1)
        ema.update(model)
        d = ema.decay(ema.updates)
        with torch.no_grad():  # upstream's per-entry update
            for k, v in reference.state_dict().items():
                m = model.state_dict()[k]
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1 - d) * m
                else:
                    v.copy_(m)
    got, want = ema.ema.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert int(got["model.0.bn.num_batches_tracked"]) == 7


def _fake_compiler(monkeypatch) -> list:
    """Replace torch.compile by a wrapper that counts calls (the real compiler takes minutes on a 2-core
    CPU; the wiring is what is tested); returns the list the wrappers are appended to."""
    wrappers = []

    def fake_compile(module):
        def forward(*args, **kwargs):
            forward.calls += 1
            return module(*args, **kwargs)
        forward.calls, forward.module = 0, module
        wrappers.append(forward)
        return forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    return wrappers


def test_compile_wraps_only_the_training_forward(tmp_path, data_yaml, monkeypatch):
    wrappers = _fake_compiler(monkeypatch)
    train.run(**BASE, data=str(data_yaml), project=str(tmp_path), name="c", compile=True)
    assert len(wrappers) == 1 and isinstance(wrappers[0].module, DetectionModel)
    assert wrappers[0].calls == 2  # 8 images at batch 4: every training step went through it
    # checkpoints hold the plain module's keys, loadable without the compiler
    assert _weights(tmp_path / "c").keys() == DetectionModel("yolov5p.yaml", nc=6).state_dict().keys()


def test_cuda_runs_autotune_unless_deterministic(monkeypatch):
    from argparse import Namespace

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        train.seed_run(Namespace(seed=0, deterministic=True), torch.device("cuda", 0))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        train.seed_run(Namespace(seed=0, deterministic=False), torch.device("cuda", 0))  # undoes the above
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.benchmark
        train.seed_run(Namespace(seed=0), torch.device("cpu"))  # CPU: always deterministic (free there)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


def test_qat_compiles_the_forward_of_each_phase_once(tmp_path, data_yaml, monkeypatch):
    """--compile --qat: the frozen view, uncompiled while the (histogram) observers run, then compiled (one
    wrapper, kept across steps); the plain prepared graph never trains; checkpoints hold the prepared model."""
    from quant.prepare import PreparedModel

    float_run = tmp_path / "f"
    train.run(**BASE, data=str(data_yaml), project=str(tmp_path), name="f")
    wrappers = _fake_compiler(monkeypatch)
    training_calls = {"prepared": 0, "view": 0}

    def count(module, args):
        if module.training and isinstance(module, PreparedModel):
            training_calls["prepared"] += 1
        elif module.training and type(module).__name__.endswith("FrozenView"):
            training_calls["view"] += 1

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    qat = dict(BASE, epochs=2, weights=str(float_run / "weights" / "last.pt"))
    try:
        train.run(**qat, data=str(data_yaml), project=str(tmp_path), name="q", compile=True, qat=True,
                  qat_observer_epochs=1.0, qat_calib_images=0)
    finally:
        hook.remove()
    assert len(wrappers) == 1 and "FrozenView" in type(wrappers[0].module).__name__
    assert wrappers[0].calls == 2  # epoch 1's steps
    assert training_calls == {"prepared": 0, "view": 4}  # epoch 0 observed through the view, uncompiled
    assert "weight_fake_quant.exponent" in " ".join(_weights(tmp_path / "q"))
