"""bench/qat_speed.py at toy size: interleaved rounds, every QAT phase in its state, eager and compiled,
the onnxruntime rows, and ratios that follow from the medians."""
from __future__ import annotations

import json
import time

import pytest
import torch

from bench.qat_speed import PHASES, Variant, interleave, run


def test_interleave_turns_the_order_each_round(monkeypatch):
    order = []
    variants = [Variant(n, n, lambda n=n: order.append(n)) for n in "abc"]
    interleave(variants, rounds=4, steps=2)
    assert order == list("aabbcc" "bbccaa" "ccaabb" "aabbcc")
    assert all(len(v.times) == 8 and v.median_ms >= 0 for v in variants)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    interleave(variants, rounds=2, steps=1, settle=0.05)
    assert slept == [0.05] * 6 and order[-6:] == list("abcbca")  # one pause before each block


def test_run_measures_every_phase_compiled_float_and_onnx(tmp_path, monkeypatch, capsys, shared_dir):
    import quant.histogram
    import quant.schedule

    picked = quant.histogram.histc_is_faster

    states = []
    real_bn = quant.schedule.set_bn_frozen

    def recording(model, frozen):  # each QAT phase's setup ends by setting BN; record the whole state then
        real_bn(model, frozen)
        quantizers = [q for _, q in quant.schedule.iter_quantizers(model) if not q.fixed]
        states.append((bool(quantizers[0].observer_enabled), frozen))

    compiled = []

    def fake_compile(module):  # the real compiler takes minutes on a 2-core CPU; the wiring is what is tested
        def forward(*args, **kwargs):
            compiled.append(1)
            return module(*args, **kwargs)
        return forward

    monkeypatch.setattr(quant.schedule, "set_bn_frozen", recording)
    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "qat_speed.json"
    result = run(cfg="yolov5p.yaml", imgsz=64, batch_size=2, rounds=2, steps=1, warmup=1, threads=1,
                 onnx_weights=shared_dir / "weights" / "yolov5n.pt", onnx_imgsz=(64,), onnx_block=1, json_out=out,
                 observer_every=4, histogram_counter="histc")
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["config"]["histogram_counter"] == "histc"
    assert quant.histogram.histc_is_faster is picked  # the machine's own choice is back after the run
    steps = result["steps"]
    assert list(steps) == ["float", *PHASES, "qat_observer_window"]
    window = steps.pop("qat_observer_window")  # derived: 1 observed step and 3 frozen-observer steps in 4
    observed = steps["qat_observe"]["eager_ms"]  # train.py --compile observes eager (histogram observers)
    for col in ("eager_ms", "compiled_ms"):
        assert window[col] == pytest.approx((observed + 3 * steps["qat_frozen_observers"][col]) / 4)
    assert sorted(set(states)) == [(False, False), (False, True), (True, False)]  # the three phases
    assert len(compiled) == 5 * (2 + 2)  # float and 4 QAT phases: compile warm-up, then one timed step per round
    for name, row in steps.items():
        assert row["steps"] == 2 and row["eager_ms"] > 0
        assert row["eager_over_float"] == pytest.approx(row["eager_ms"] / steps["float"]["eager_ms"])
        assert row["compiled_over_float"] == pytest.approx(row["compiled_ms"] / steps["float"]["compiled_ms"])
        assert row["compiled_over_eager"] == pytest.approx(row["compiled_ms"] / row["eager_ms"])
    (latency,) = result["onnx"]
    assert latency["imgsz"] == 64 and latency["runs"] == 2
    assert latency["int8_over_fp32"] == pytest.approx(latency["int8_median_ms"] / latency["fp32_median_ms"])
    printed = capsys.readouterr().out
    assert "QAT, observers and BN frozen" in printed and "x eager" in printed and "INT8/FP32" in printed
    assert "observer window, 1 in 4 observed" in printed and "histograms counted by histc" in printed


def test_run_refuses_empty_rounds_and_unknown_counters():
    with pytest.raises(ValueError, match="--rounds"):
        run(rounds=0)
    with pytest.raises(ValueError, match="--histogram-counter"):
        run(histogram_counter="sort")


def test_qat_profile_tables_and_fault_counts():
    from bench.qat_profile import run as profile

    tables = profile(phase=("float", "qat_frozen"), cfg="yolov5p.yaml", imgsz=64, batch_size=1, steps=1, top=3)
    assert set(tables) == {"float", "qat_frozen"} and all("Self CPU" in t for t in tables.values())
    counts = profile(phase=("qat_observe",), cfg="yolov5p.yaml", imgsz=64, batch_size=1, steps=1, faults=True)
    assert "minor page faults/step" in counts["qat_observe"]


def test_fq_kernel_ab_times_every_kernel_set_and_restores_the_default():
    """bench.fq_kernel_ab on a tiny model: a row per QAT phase and kernel set, the ReLU-fold row for the two
    frozen-view phases, and Pow2FakeQuantize's kernels back to the defaults afterwards."""
    import quant.fake_quant as fake_quant
    import quant.fq_ops as fq_ops
    from bench.fq_kernel_ab import kernel_sets, run

    rows = run(rounds=1, steps=1, imgsz=64, batch_size=2, cfg="yolov5p.yaml")
    assert len(rows) == 1 + 4 * len(kernel_sets()) + 2 and all(ms > 0 for ms in rows.values())
    assert sum("ReLU folded" in name for name in rows) == 2
    assert fake_quant.RangeMaskFakeQuantCPU is fq_ops.RangeMaskFakeQuantCPU
    assert fake_quant.ChannelRangeMaskFakeQuantCPU is fq_ops.ChannelRangeMaskFakeQuantCPU
