"""utils.train.forward.TrainingForward: which module a step calls, eager, under --compile and under DDP."""
from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.yolo import DetectionModel
from quant.config import QuantConfig
from quant.prepare import prepare
from quant.schedule import iter_quantizers, set_observers
from tests.tiny_nets import AddConcatNet
from utils.qat import prepare_qat_model
from utils.train.forward import TrainingForward, ddp_wrapper


def _tiny_prepared() -> nn.Module:
    return prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()


def test_compile_keeps_histogram_observing_steps_eager():
    """--compile: while histogram observers run (they count on the host, between graphs) the step calls the
    frozen view uncompiled; once they are frozen, the compiled frozen view. Min/max observers trace, so their
    observing steps are compiled too."""
    prepared = _tiny_prepared()
    assert any(q.spec.observer == "histogram" for _, q in iter_quantizers(prepared))  # the default recipe
    forwards = TrainingForward(prepared, compile=True)
    assert forwards.pick(observers_frozen=False) is forwards.frozen_view is not None and forwards._compiled is None
    set_observers(prepared, False)
    frozen = forwards.pick(observers_frozen=True)
    assert frozen is forwards._compiled is not None and frozen is not forwards.frozen_view

    config = QuantConfig.from_dict({"activation": {"observer": "ema_minmax", "rounding": "ceil"}})
    device_side = prepare(AddConcatNet(pool=True), (torch.rand(2, 3, 32, 32),), config).train()
    forwards = TrainingForward(device_side, compile=True)
    assert forwards.pick(observers_frozen=False) is forwards._compiled is not None


def test_eager_picks_the_frozen_view():
    """A prepared model trains through its frozen view in every phase; a float model is called itself; a
    wrapper (DDP's, under DDP) is put around the view, not around the model."""
    prepared = _tiny_prepared()
    forwards = TrainingForward(prepared, compile=False)
    view = forwards.pick(observers_frozen=False)
    assert view is not prepared and view is forwards.pick(observers_frozen=True) is forwards.frozen_view
    float_model = DetectionModel("yolov5p.yaml", act="relu", nc=2)
    assert TrainingForward(float_model, compile=False).pick() is float_model
    x = torch.rand(1, 3, 64, 64)
    assert [o.shape for o in view(x)] == [o.shape for o in prepared(x)]

    wrapped = TrainingForward(prepared, compile=False, wrap=nn.Sequential)
    assert isinstance(wrapped.pick(), nn.Sequential) and wrapped.pick()[0] is wrapped.frozen_view
    prepared.eval()
    wrapped.train()
    assert prepared.training and wrapped.pick().training and wrapped.frozen_view.training


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        prepared = _tiny_prepared()
        forwards = TrainingForward(prepared, compile=False, wrap=ddp_wrapper(SimpleNamespace(rank=0, local_rank=0),
                                                                             cuda=False))
        step = forwards.pick()
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        for _, q in iter_quantizers(prepared):
            q._aggregate = False
        step(x)  # an observed step through DDP's wrapper: the view's pre-hook starts an observation step
        began = all(q._aggregate for _, q in iter_quantizers(prepared))
        full = copy.deepcopy(prepared)  # the same state, run through the full prepared graph
        set_observers(prepared, False)
        set_observers(full, False)
        for module in (forwards.pick(observers_frozen=True), full):
            sum(o.float().square().mean() for o in module(x)).backward()
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(prepared.named_parameters(), full.parameters())]
        torch.save({"ddp_holds_view": isinstance(step, nn.parallel.DistributedDataParallel)
                    and step.module is forwards.frozen_view,
                    "began": began,
                    "different": [n for n, a, b in grads if not torch.equal(a, b)],
                    "grads": sum(a is not None for _, a, _ in grads)}, Path(out_dir) / "ddp.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_wraps_the_frozen_view(tmp_path):
    """Under DDP the wrapper holds the frozen view: observed steps are counted through it (the view's own
    pre-hook), and with observers frozen its gradients equal the full prepared graph's bit for bit."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True)
    out = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert out["ddp_holds_view"] and out["began"]
    assert out["grads"] > 50 and not out["different"], out["different"][:5]
