"""utils.train.forward.TrainingForward: which module a step calls, and the --compile notice for CPU QAT."""
from __future__ import annotations

import logging

import torch

from models.yolo import DetectionModel
from utils.qat import prepare_qat_model
from utils.train.forward import TrainingForward


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_compile_with_qat_on_cpu_warns_once(caplog):
    """--compile with a QAT model on the CPU says, once, that it measured slower than eager; a float model
    compiles without the warning. Frozen observers pick the frozen view (a single process)."""
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()
    forwards = TrainingForward(prepared, compile=True, single_process=True)
    with caplog.at_level(logging.INFO):
        forwards.pick(observers_frozen=False)
        forwards.pick(observers_frozen=True)
    assert sum("slower compiled than eager" in m for m in _warnings(caplog)) == 1
    assert forwards.frozen_view is not None and len(forwards._compiled) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        TrainingForward(DetectionModel("yolov5p.yaml", nc=2), compile=True, single_process=True).pick()
    assert not _warnings(caplog)


def test_eager_picks_the_model_or_the_frozen_view():
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()
    forwards = TrainingForward(prepared, compile=False, single_process=True)
    assert forwards.pick(observers_frozen=False) is prepared
    view = forwards.pick(observers_frozen=True)
    assert view is not prepared and view is forwards.pick(observers_frozen=True)
    assert TrainingForward(prepared, compile=False, single_process=False).pick(observers_frozen=True) is prepared
    x = torch.rand(1, 3, 64, 64)
    assert [o.shape for o in view(x)] == [o.shape for o in prepared(x)]
