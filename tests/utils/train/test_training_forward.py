"""utils.train.forward.TrainingForward: which module a step calls, eager and under --compile."""
from __future__ import annotations

import torch

from models.yolo import DetectionModel
from quant.config import QuantConfig
from quant.prepare import prepare
from quant.schedule import iter_quantizers
from tests.tiny_nets import AddConcatNet
from utils.qat import prepare_qat_model
from utils.train.forward import TrainingForward


def test_compile_keeps_histogram_observing_steps_eager():
    """--compile: while histogram observers run (they count on the host, between graphs) the step calls the
    frozen view uncompiled; once they are frozen, the compiled frozen view. Min/max observers trace, so their
    observing steps are compiled too."""
    from quant.schedule import set_observers

    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()
    assert any(q.spec.observer == "histogram" for _, q in iter_quantizers(prepared))  # the default recipe
    forwards = TrainingForward(prepared, compile=True, single_process=True)
    assert forwards.pick(observers_frozen=False) is forwards.frozen_view is not None and not forwards._compiled
    set_observers(prepared, False)
    frozen = forwards.pick(observers_frozen=True)
    assert frozen is forwards._compiled[id(forwards.frozen_view)]

    config = QuantConfig.from_dict({"activation": {"observer": "ema_minmax", "rounding": "ceil"}})
    device_side = prepare(AddConcatNet(pool=True), (torch.rand(2, 3, 32, 32),), config).train()
    forwards = TrainingForward(device_side, compile=True, single_process=True)
    assert forwards.pick(observers_frozen=False) is forwards._compiled[id(forwards.frozen_view)]


def test_eager_picks_the_frozen_view_in_one_process():
    """A prepared model trains through its frozen view in every phase in one process; under DDP (and for a
    float model) the step calls the model itself."""
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()
    forwards = TrainingForward(prepared, compile=False, single_process=True)
    view = forwards.pick(observers_frozen=False)
    assert view is not prepared and view is forwards.pick(observers_frozen=True) is forwards.frozen_view
    assert TrainingForward(prepared, compile=False, single_process=False).pick(observers_frozen=True) is prepared
    assert TrainingForward(prepared, compile=False, single_process=False).pick(observers_frozen=False) is prepared
    float_model = DetectionModel("yolov5p.yaml", act="relu", nc=2)
    assert TrainingForward(float_model, compile=False, single_process=True).pick() is float_model
    x = torch.rand(1, 3, 64, 64)
    assert [o.shape for o in view(x)] == [o.shape for o in prepared(x)]
