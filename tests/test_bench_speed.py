"""Smoke test of bench/speed.py at toy size: the three training rows and validation run through the
real trainer and val.py, epoch 0 is left out of the figures, and the ratios follow from the rows."""
from __future__ import annotations

import json

import pytest
import torch

from bench.speed import ratios, run, training_speed


def test_training_speed_skips_the_warm_up_epoch():
    epochs = [{"epoch": 0, "images": 10, "seconds": 100.0, "first_batch_s": 50.0},
              {"epoch": 1, "images": 10, "seconds": 1.5, "first_batch_s": 0.5},
              {"epoch": 2, "images": 10, "seconds": 2.5, "first_batch_s": 0.5}]
    speed = training_speed(epochs)
    assert speed["images"] == 20 and speed["seconds"] == 4.0 and speed["images_per_s"] == 5.0
    assert speed["steady_images_per_s"] == 20 / 3.0  # without the waits for each epoch's first batch
    assert training_speed(epochs[:1])["images_per_s"] == 0.1  # a single epoch is all there is


def test_ratios():
    rows = {"float": {"steady_images_per_s": 300.0}, "float_upstream_settings": {"steady_images_per_s": 150.0},
            "qat": {"steady_images_per_s": 250.0}}
    r = ratios(rows, upstream=100.0)
    assert r == {"float_over_upstream_settings": 2.0, "qat_over_float_time": 1.2, "float_over_upstream": 3.0,
                 "qat_over_upstream": 2.5}
    assert "float_over_upstream" not in ratios(rows, upstream=None)


def test_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = run(cfg="yolov5p.yaml", imgsz=64, batch_size=8, epochs=2, images=16, val_images=4, workers=0,
                 device="cpu", project=str(tmp_path / "runs"), json_out=str(out), upstream_images_per_s=10.0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert set(rows) == {"float_upstream_settings", "float", "qat", "val"}
    for key in ("float_upstream_settings", "float", "qat"):
        assert [e["epoch"] for e in rows[key]["epochs"]] == [0, 1]
        assert rows[key]["images"] == 16 and rows[key]["images_per_s"] > 0  # epoch 1 only
        first_wait = rows[key]["epochs"][1]["first_batch_s"]
        assert 0 < first_wait < rows[key]["seconds"] and rows[key]["steady_images_per_s"] > rows[key]["images_per_s"]
    assert rows["val"]["images"] == 4 and 0 <= rows["val"]["map50_95"] <= 1
    assert (tmp_path / "runs" / "qat" / "qat_plan.txt").is_file()  # the QAT row really trained QAT
    assert result["ratios"]["float_over_upstream"] == pytest.approx(rows["float"]["steady_images_per_s"] / 10.0)
    printed = capsys.readouterr().out
    assert "QAT / float time per image" in printed and "float / upstream" in printed


def test_run_refuses_one_epoch(tmp_path):
    with pytest.raises(ValueError, match="--epochs must be >= 2"):
        run(epochs=1, project=str(tmp_path))


def test_loader_cost_runs_like_a_worker(tmp_path):
    import torch.utils.data._utils.worker as worker_state

    from bench.loader_cost import run as loader_cost
    from utils.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "syn", n_train=8, n_val=1, img_size=64)
    result = loader_cost(str(tmp_path / "syn" / "images" / "train"), imgsz=64, batch_size=4, batches=3)
    assert result["samples"] == 12 and result["ms_per_sample"] > 0
    assert worker_state._worker_info is None  # the fake worker context is gone afterwards


def test_gpu_speed_script_runs_on_cpu(tmp_path):
    """bench/gpu_speed.sh at toy settings (the GPU run uses the same three commands at full size)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DEVICE": "cpu", "CFG": "yolov5p.yaml", "IMGSZ": "64", "BATCH": "8", "IMAGES": "16",
           "WORKERS": "0", "COMPILE": "0", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(repo / "bench" / "gpu_speed.sh"), str(tmp_path / "out"), "100"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    speed = json.loads((tmp_path / "out" / "speed.json").read_text())
    steps = json.loads((tmp_path / "out" / "train_speed.json").read_text())
    assert "float_over_upstream" in speed["ratios"] and "qat_frozen" in steps["stages"]
    qat = json.loads((tmp_path / "out" / "qat_speed.json").read_text())
    assert qat["config"]["device"] == "cpu" and "qat_frozen" in qat["steps"] and "onnx" not in qat


def test_mask_cost_times_every_eager_pass(capsys):
    from bench.mask_cost import run

    rows = run(shape=(2, 4, 8, 8), runs=2)
    assert len(rows) == 8 and all(ms > 0 for ms in rows.values())
    assert "x * keep (float 1/0)" in rows and "x * keep (float 1/0)" in capsys.readouterr().out


def test_onnx_op_cost_times_each_one_node_model(capsys):
    """Each one-node model runs in onnxruntime and gets a time; the Gather row indexes a per-channel table
    with the int8 codes (every index inside the table, or onnxruntime would fail)."""
    from bench.onnx_op_cost import run

    rows = run(shape=(1, 3, 4, 4, 85), runs=2, threads=1)
    assert len(rows) == 7 and all(ms > 0 for ms in rows.values())
    assert "Gather from a per-channel code table" in capsys.readouterr().out


@pytest.mark.parametrize("variant", ["scatter", "concat_last"])
def test_decode_ab_variants_decode_as_the_head_does(variant):
    """bench.decode_ab: each joined-level decode gives Detect's own boxes, eager and through an ONNX export
    in onnxruntime, and the patch is gone after the block."""
    import io

    import numpy as np
    import onnx
    import onnxruntime as ort

    from bench.decode_ab import export_decode, joined_decode
    from models.yolo import Detect, DetectionModel
    from utils.export.onnx_backend import session_options

    model = DetectionModel("yolov5p.yaml", nc=3, act="relu").eval()
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        boxes, maps = model(x)
        assert torch.allclose(joined_decode(model.model[-1], maps, variant), boxes, rtol=1e-6, atol=1e-4)
        shipped = Detect.forward
        with export_decode(variant):
            assert Detect.forward is not shipped
            assert torch.equal(model(x)[0], boxes)  # eager forwards keep the shipped decode
            f = io.BytesIO()
            torch.onnx.export(model, (x,), f, opset_version=17, dynamo=False, input_names=["images"],
                              output_names=["output0"])
        assert Detect.forward is shipped
    ops = {n.op_type for n in onnx.load_from_string(f.getvalue()).graph.node}
    assert ("ScatterElements" in ops) == (variant == "scatter") and "Split" not in ops
    out = ort.InferenceSession(f.getvalue(), session_options(ort), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(out, boxes.numpy(), rtol=1e-5, atol=1e-3)


def test_observer_cost_counts_one_in_n_images_over_the_full_range(capsys):
    """bench.observer_cost: inside counting_every(n) a histogram counts images 0, n, 2n... binned over the
    range of the whole batch; outside it counts everything again. The histc rows and a small agreement
    run come back complete."""
    from bench.observer_cost import counting_every, run, subsample_agreement
    from quant.histogram import HIST_BINS, ValueHistogram, nonnegative_counts, needed_exponent

    x = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x[5] *= 8  # the largest values sit in an image that is not counted
    h, whole = ValueHistogram(), ValueHistogram()
    with counting_every(3):
        assert h.add(x) == (float(x.min()), float(x.max()))
    whole.add(x)
    assert h.total == 2 * 32 and h.top == whole.top > needed_exponent(float(x[::3].max()))  # the batch's range
    assert torch.equal(h.hist, nonnegative_counts(x[::3].reshape(-1), whole.top, HIST_BINS))
    again = ValueHistogram()
    again.add(x)
    assert again.total == x.numel()  # the patch is gone after the block

    result = run(shape=(2, 4, 8, 8), runs=2)
    assert len(result["histc_ms"]) == 6 and all(ms > 0 for ms in result["histc_ms"].values())
    assert result["counter"] in {"histc", "bincount"}
    agreement = subsample_agreement((2,), imgsz=64, images=8)
    assert agreement[0]["quantizers"] > 20 and 0 <= agreement[0]["same"] <= agreement[0]["quantizers"]
    assert "counting 1 in 2 images" in capsys.readouterr().out


def test_decode_ab_codes_moved_keeps_outputs_and_integer_head_convs(tmp_path):
    """bench.decode_ab.codes_moved: the head's Slice/Transpose/Reshape/Transpose run on uint8 codes before
    the DequantizeLinear; onnxruntime gives the same outputs and still runs every conv as QLinearConv."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort

    from bench.decode_ab import codes_moved
    from bench.int8_latency import SHARED, build_pair
    from utils.export.onnx_backend import session_options

    _, int8 = build_pair(SHARED / "weights" / "yolov5n.pt", 64, tmp_path, calib=2)
    shipped = onnx.load(str(int8))
    moved = codes_moved(shipped)
    heads = [n for n in moved.graph.node if n.op_type == "DequantizeLinear" and "head_codes_zero_point" in n.input]
    assert len(heads) == 3 and all(n.input[0].endswith("_codes") for n in heads)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    outs, kernels = [], []
    for i, model in enumerate((shipped, moved)):
        options = session_options(ort)
        options.optimized_model_filepath = str(tmp_path / f"optimized_{i}.onnx")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
        kernels.append(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))
    assert np.array_equal(outs[0], outs[1])
    assert kernels[1]["QLinearConv"] == kernels[0]["QLinearConv"] == 60 and kernels[1]["Conv"] == 0


def test_int8_latency_profile_sums_node_times_per_op_type(tmp_path, caplog):
    """bench.int8_latency --profile: onnxruntime's per-node profile per op type, float convs in the FP32
    file and integer convs in the INT8 one, every time positive."""
    import logging

    from bench.int8_latency import SHARED, build_pair, log_op_types

    fp32, int8 = build_pair(SHARED / "weights" / "yolov5n.pt", 64, tmp_path, calib=2)
    with caplog.at_level(logging.INFO, logger="bench.int8_latency"):
        profiles = log_op_types(fp32, int8, runs=3, threads=1)
    assert set(profiles) == {"fp32", "int8_exact", "int8_default_kernels"}
    assert profiles["fp32"]["Conv"] > 0 and "QLinearConv" not in profiles["fp32"]
    for name in ("int8_exact", "int8_default_kernels"):
        assert profiles[name]["QLinearConv"] > 0 and "Conv" not in profiles[name]
        assert all(ms > 0 for ms in profiles[name].values())
    assert caplog.text.count("the float convs") == 3


def test_joined_counting_compares_the_full_graph_with_the_view(capsys, shared_dir):
    """bench.joined_counting: inside full_graph_observing calibration and observed steps use the prepared
    model itself, outside it the frozen view; the PTQ comparison runs and names what differs."""
    import quant.calibrate
    from bench.joined_counting import full_graph_observing, ptq_rows
    from models.yolo import DetectionModel
    from quant.config import QuantConfig
    from quant.prepare import prepare
    from utils.train.forward import TrainingForward

    prepared = prepare(DetectionModel("yolov5p.yaml", nc=3, act="relu").train(), torch.zeros(1, 3, 64, 64),
                       QuantConfig(leaf_modules=("Detect",)))
    forwards = TrainingForward(prepared, compile=False)
    assert quant.calibrate._observing_forward(prepared) is not prepared and forwards.pick() is not prepared
    with full_graph_observing():
        assert quant.calibrate._observing_forward(prepared) is prepared and forwards.pick() is prepared
        assert forwards.pick(observers_frozen=True) is forwards.frozen_view
    assert quant.calibrate._observing_forward(prepared) is not prepared and forwards.pick() is forwards.frozen_view
    row = ptq_rows(str(shared_dir / "weights" / "yolov5n.pt"), imgsz=64, images=8, batch_size=4)
    assert row["quantizers"] > 20 and row["same"] + len(row["differ"]) == row["quantizers"]
    assert "activation exponents the same" in capsys.readouterr().out
