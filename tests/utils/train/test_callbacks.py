"""utils.train.callbacks: TensorBoard event files when tensorboard imports, a one-line notice when not."""
from __future__ import annotations

import logging
import sys

import pytest

from utils.train.callbacks import RESULT_KEYS, ResultsLogger


def test_tensorboard_event_file_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = ResultsLogger(tmp_path)
    log.log_epoch(0, [0.1] * len(RESULT_KEYS))
    log.log_epoch(1, [0.2] * len(RESULT_KEYS))
    log.close()
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (tmp_path / "results.csv").is_file()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = acc.Scalars("metrics/mAP_0.5")
    assert [s.step for s in scalars] == [0, 1] and abs(scalars[1].value - 0.2) < 1e-6


def test_missing_tensorboard_is_a_one_line_notice(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    log = ResultsLogger(tmp_path)
    log.log_epoch(0, [0.1] * len(RESULT_KEYS))
    log.close()
    assert log.tb is None and (tmp_path / "results.csv").is_file()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    notices = [r.getMessage() for r in caplog.records if "TensorBoard: not installed" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
