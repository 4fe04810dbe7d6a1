"""The accuracy benchmarks' pieces that need no long run: variant composition and the printed tables."""
from __future__ import annotations

from pathlib import Path

import yaml

from bench.ptq_accuracy import VARIANTS, format_table, merge_config, scored_on
from bench.qat_recipe import _combined
from bench.qat_recipe import format_table as qat_table
from quant.config import QuantConfig
from utils.paths import ROOT


def test_every_ptq_variant_builds_a_valid_config():
    base = yaml.safe_load((ROOT / "data" / "quant" / "default.yaml").read_text())
    for name, changes in VARIANTS.items():
        cfg = QuantConfig.from_dict(merge_config(base, changes), source=name)
        assert cfg.leaf_modules == ("Detect",), name
    before = QuantConfig.from_dict(merge_config(base, VARIANTS["before"]))
    assert before.weight.rounding == "round" and before.activation.observer == "ema_minmax"
    assert not before.bias_correction and before.weight.per_channel  # spec keys merge field by field
    stacked = QuantConfig.from_dict(merge_config(merge_config(base, VARIANTS["stage1"]), VARIANTS["w_mse"]))
    assert stacked.weight.rounding == "mse" and not stacked.bias_correction and stacked.rules == ()


def test_ptq_table_reports_drops_in_points(tmp_path):
    rows = [{"variant": "float", "mAP50": 0.5, "mAP50-95": 0.3, "seconds": 1.0},
            {"variant": "default", "mAP50": 0.49, "mAP50-95": 0.297, "seconds": 9.0, "calibrate_s": 5.0,
             "bias_corrected": 3, "bias_correction_s": 2.0, "learned_rounding_s": 0.0}]
    table = format_table(rows, "coco128")
    assert "| default | 0.490 | 0.297 | -0.3 | 5.0 | - | 2.0 | 9 |" in table
    (tmp_path / "images").mkdir()
    data = tmp_path / "d.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images", "val": "images", "names": ["a"]}))
    assert scored_on(str(data)).endswith("(also the training images: in-sample)")


def test_qat_recipe_variants_combine():
    spec = _combined("frozen_ranges+no_ema")
    assert spec == {"opt": {"qat_observer_epochs": 0}, "hyp": {"ema_decay": 0.0}, "quant": {}}
    spec = _combined("tqt_all+lr_thr_0.05+distill")  # quant sections merge field by field
    assert spec["quant"] == {"activation": {"trained_threshold": True}, "weight": {"trained_threshold": True}}
    assert spec["hyp"] == {"lr_threshold": 0.05} and spec["opt"] == {"qat_distill": True}
    table = qat_table([{"variant": "float", "mAP50": 0.5, "mAP50-95": 0.3},
                       {"variant": "QAT default", "mAP50": 0.5, "mAP50-95": 0.31, "s_per_epoch": 12.0,
                        "onnx_mAP50-95": 0.31}], 5, "coco128")
    assert "| QAT default | 0.500 | 0.310 | +1.0 | 0.310 | 12 |" in table


def test_split_dataset_halves_without_overlap(tmp_path):
    from bench.split_dataset import split

    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        (images / f"{i}.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")
    data = yaml.safe_load(split(images, tmp_path / "out", seed=0).read_text())
    train, val = ((tmp_path / "out" / data[k]).read_text().split() for k in ("train", "val"))
    assert len(train) == 4 and len(val) == 5 and not set(train) & set(val)
    assert {Path(p).name for p in train + val} == {f"{i}.jpg" for i in range(9)}
    again = split(images, tmp_path / "again", seed=0)  # the same seed gives the same halves
    assert (again.parent / "train.txt").read_text() == (tmp_path / "out" / "train.txt").read_text()
    assert data["names"][0] == "person"
