"""Smoke test of bench/train_speed.py at toy sizes: every stage runs, counts and ratios add up."""
from __future__ import annotations

import json

import pytest
import torch

from bench.train_speed import DEFAULT_HYP, bench_qat, build_float_model, load_hyp, random_batch, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from utils.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), n_train=4, n_val=1, img_size=64)


def test_random_batch_targets_are_valid():
    imgs, targets = random_batch(3, 64, nc=5, device=CPU, seed=1)
    assert imgs.shape == (3, 3, 64, 64) and 0 <= imgs.min() and imgs.max() <= 1
    assert targets.shape[1] == 6
    assert set(targets[:, 0].long().tolist()) == {0, 1, 2}
    assert targets[:, 1].max() < 5
    xy, wh = targets[:, 2:4], targets[:, 4:6]
    assert (xy - wh / 2 >= 0).all() and (xy + wh / 2 <= 1).all()  # boxes inside the image
    assert torch.equal(random_batch(3, 64, 5, CPU, seed=1)[1], targets)  # seeded


def test_qat_phases_switch_observers_off(monkeypatch):
    import quant.schedule

    calls = []
    real = quant.schedule.set_observers

    def recording(model, on):
        real(model, on)
        quantizers = [q for _, q in quant.schedule.iter_quantizers(model) if not q.fixed]  # fixed: always off
        calls.append((on, bool(quantizers) and all(bool(q.observer_enabled) == on for q in quantizers)))

    monkeypatch.setattr(quant.schedule, "set_observers", recording)
    model = build_float_model("yolov5p.yaml", 2, "relu", CPU)
    observe, frozen = bench_qat(model, random_batch(2, 64, 2, CPU), load_hyp(DEFAULT_HYP), steps=3, warmup=0,
                                device=CPU)
    assert calls == [(True, True), (False, True)]  # every quantizer on, then every one off
    assert (len(observe.times), len(frozen.times)) == (1, 2)
    assert observe.images_per_s > 0 and frozen.images_per_s > 0


def test_run_writes_all_stages(tiny_data, tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = run(cfg="yolov5p.yaml", imgsz=64, batch_size=2, steps=2, warmup=0, workers=0, device="cpu",
                 data=tiny_data, act="relu", loader_batches=3, json_out=out)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    stages = saved["stages"]
    assert list(stages) == ["loader", "float", "qat_observe", "qat_frozen"]
    assert stages["loader"]["batches"] == 3  # 4 images in batches of 2: the loader had to cycle
    assert stages["float"]["batches"] == 2
    assert stages["qat_observe"]["batches"] == stages["qat_frozen"]["batches"] == 1
    assert all(s["images_per_s"] > 0 and s["batch_size"] == 2 for s in stages.values())
    r, float_ms = saved["ratios"], stages["float"]["mean_ms"]
    assert r["qat_frozen_over_float_time"] == pytest.approx(stages["qat_frozen"]["mean_ms"] / float_ms)
    assert r["qat_observe_over_float_time"] == pytest.approx(stages["qat_observe"]["mean_ms"] / float_ms)
    assert r["loader_over_float_images"] == pytest.approx(
        stages["loader"]["images_per_s"] / stages["float"]["images_per_s"])
    assert saved["config"]["imgsz"] == 64 and saved["config"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "QAT/float step time" in printed and "loader (mosaic, 0 workers)" in printed


def test_run_refuses_too_few_steps(tiny_data):
    with pytest.raises(ValueError, match="--steps"):
        run(cfg="yolov5p.yaml", imgsz=64, steps=1, device="cpu", data=tiny_data, no_loader=True)

