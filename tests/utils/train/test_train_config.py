"""TrainConfig and DistContext: built once by train.py, passed to the trainer and loaders."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import train
from utils.train.config import DistContext, TrainConfig

REPO = Path(__file__).resolve().parents[3]


def _opt():
    opt = train.make_opt(data="data.yaml", cfg="yolov5n.yaml", weights="", freeze=[0, 1])
    opt.save_dir = "runs/train/exp"
    return opt


def test_config_gives_back_the_options_exactly():
    opt = _opt()
    cfg = TrainConfig.from_namespace(opt)
    assert cfg.batch_size == 16 and cfg.freeze == (0, 1) and cfg.hyp == opt.hyp and not cfg.extra
    assert list(cfg.to_dict().items()) == list(vars(opt).items())
    # opt.yaml is written from to_dict: byte for byte what vars(opt) gave
    assert yaml.safe_dump(cfg.to_dict(), sort_keys=False) == yaml.safe_dump(vars(opt), sort_keys=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3


def test_config_keeps_unknown_keys_of_an_older_run_in_place():
    saved = {**vars(_opt()), "old_flag": 7}
    cfg = TrainConfig.from_namespace(saved)
    assert cfg.extra == {"old_flag": 7} and cfg.to_dict() == saved and list(cfg.to_dict()) == list(saved)


def test_dist_context(monkeypatch):
    assert DistContext() == DistContext(-1, -1, 1) and DistContext().main and not DistContext().distributed
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ctx = DistContext.from_env()
    assert ctx == DistContext(1, 1, 2) and not ctx.main and ctx.distributed


def test_library_reads_no_distributed_environment():
    pattern = re.compile(r"getenv\(\s*[\"'](RANK|LOCAL_RANK|WORLD_SIZE)")
    allowed = REPO / "utils" / "train" / "config.py"
    hits = [str(p.relative_to(REPO)) for pkg in ("utils", "models", "quant") for p in (REPO / pkg).rglob("*.py")
            if pattern.search(p.read_text(encoding="utf-8")) and p != allowed]
    assert not hits, f"read the DistContext instead: {hits}"
