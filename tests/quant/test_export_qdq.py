"""QDQ ONNX export of QAT checkpoints: structure, ranges JSON, onnxruntime agreement, mAP."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import onnx

from onnx import numpy_helper  # noqa: E402

from models.yolo import DetectionModel  # noqa: E402
from quant.schedule import iter_quantizers  # noqa: E402
from utils.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from utils.export.job import export_weights  # noqa: E402
from utils.export.onnx_backend import session_options  # noqa: E402
from utils.qat import prepare_qat_model, qat_checkpoint_entry  # noqa: E402


def _qat_checkpoint(path, imgsz=64):
    torch.manual_seed(0)
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), imgsz)
    prepared.train()
    for _ in range(2):  # observers calibrate (and BN statistics move) on random images
        prepared(torch.rand(2, 3, imgsz, imgsz))
    prepared.eval()
    save_checkpoint(make_checkpoint(prepared, quant=qat_checkpoint_entry(prepared)), path)
    return prepared


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq")
    prepared = _qat_checkpoint(folder / "qat.pt")
    result = export_weights(folder / "qat.pt", imgsz=64, check_images=[])
    return prepared, result, onnx.load(str(result.file))


def _values(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:  # shared constants arrive through Identity
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    return inits


def test_qdq_file_and_metadata(exported):
    _, result, model = exported
    assert result.file.suffix == ".onnx" and result.ranges_file.is_file()
    assert all(c.passed for c in result.checks) and result.checks[0].fraction_within >= 0.999
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["quant"])["scheme"] == "pow2-int8"
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops


def test_scales_are_powers_of_two_and_zero_points_zero(exported):
    _, _, model = exported
    values = _values(model)
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(nodes) > 100
    for node in nodes:
        scale = values[node.input[1]].astype(np.float64).reshape(-1)
        mant, _ = np.frexp(scale)
        assert (mant == 0.5).all(), (node.name, scale)
        assert not values[node.input[2]].any()


def test_dtypes_follow_training(exported):
    prepared, _, model = exported
    values = _values(model)
    zps = {n.output[0]: values[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert values[next(n for n in model.graph.node if n.op_type == "QuantizeLinear").input[2]].dtype == np.uint8
    assert {np.dtype(np.uint8), np.dtype(np.int8)} == set(zps.values())  # ReLU outputs uint8, head int8
    conv_weights = [values[p.input[0]] for n in model.graph.node if n.op_type == "Conv"
                    for p in model.graph.node if p.op_type == "DequantizeLinear" and p.output[0] == n.input[1]]
    assert len(conv_weights) == 60 and all(w.dtype == np.int8 for w in conv_weights)
    biases = [values[p.input[0]] for n in model.graph.node if n.op_type == "Conv"
              for p in model.graph.node if p.op_type == "DequantizeLinear" and p.output[0] == n.input[2]]
    assert len(biases) == 60 and all(b.dtype == np.int32 for b in biases)


def test_concat_inputs_share_one_scale(exported):
    _, _, model = exported
    values = _values(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    checked = 0
    for node in (n for n in model.graph.node if n.op_type == "Concat"):
        scales = set()
        for t in node.input:
            p = producer.get(t)
            while p is not None and p.op_type in ("MaxPool", "Resize"):
                p = producer.get(p.input[0])
            if p is not None and p.op_type == "DequantizeLinear":
                scales.add(float(values[p.input[1]]))
        if scales:
            assert len(scales) == 1, node.name
            checked += 1
    assert checked == 13  # 8 C3 blocks + SPPF + 4 head joins


def test_onnxruntime_runs_every_conv_on_integer_kernels(exported):
    """The default export (free height/width): onnxruntime's optimised graph has a QLinearConv for each of
    the 60 convs and no float Conv, and every concat and upsample on 8-bit tensors. The head's sizes come
    from the input, so no Shape op reads a quantized conv output (those Shape readers once kept the three
    head convs float, and made OpenVINO misapply their biases)."""
    from quant.qdq_onnx import read_steps
    from utils.export.onnx_runtimes import ConvKernels, conv_kernels, ort_optimized_ops

    _, result, model = exported
    ops = ort_optimized_ops(result.file)
    assert conv_kernels(ops) == ConvKernels(integer=60, float=0)
    # every aligned concat joins 8-bit tensors, the two after an upsample too (their Resize stays 8-bit);
    # the only float conversions left are the input's QuantizeLinear and the head's three DequantizeLinear
    assert ops["QLinearConcat"] == 13 and ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 3
    shape_inputs = [n.input[0] for n in model.graph.node if n.op_type == "Shape"]
    assert "images" in shape_inputs and read_steps(model, shape_inputs) == [None] * len(shape_inputs)


def test_runtime_agreement_bench_on_the_export(exported, shared_dir, monkeypatch, capsys):
    """bench/runtime_agreement.py without OpenVINO: onnxruntime with all optimisations equals its
    unoptimised run (the specification's arithmetic) on every head value and box."""
    import utils.export.onnx_runtimes
    from bench.runtime_agreement import run

    monkeypatch.setattr(utils.export.onnx_runtimes, "openvino_runner", lambda path: None)
    _, result, _ = exported
    out = run(str(result.file), imgsz=64, images=[str(shared_dir / "images" / "bus.jpg")])
    assert (out["ort_qlinearconv"], out["ort_float_conv"]) == (60, 0) and out["head_steps"] == [1 / 16] * 3
    assert all(lv["max_steps"] == 0 for lv in out["onnxruntime"]["levels"]) and "openvino" not in out
    assert out["onnxruntime"]["matched"] == out["onnxruntime"]["boxes"] == out["onnxruntime"]["ref_boxes"]
    assert len(out["onnxruntime_default_kernels"]["levels"]) == 3  # its agreement depends on the CPU (VNNI or not)
    printed = capsys.readouterr().out
    assert "openvino: not installed" in printed and "without x64quantprecision" in printed


def test_exact_int8_session_option_and_unshared_weight_zero_points(exported):
    """Every session the project opens asks onnxruntime for exact 8-bit kernels (on x86 CPUs without VNNI
    its default ones saturate); that mode rewrites each conv's weight zero point, so the export gives every
    weight DequantizeLinear a zero point of its own (shared ones made onnxruntime 1.32 fail to load it)."""
    import onnxruntime as ort

    from utils.export.onnx_backend import EXACT_INT8_CONFIG

    key, value = EXACT_INT8_CONFIG
    assert session_options(ort).get_session_config_entry(key) == value
    assert session_options(ort, exact_int8=False, threads=1).intra_op_num_threads == 1
    _, result, model = exported
    inits = {i.name for i in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
                  and n.input[0] in inits and len(n.input) > 2]
    zero_points = [n.input[2] for n in weight_dqs]
    assert len(weight_dqs) >= 60 and len(set(zero_points)) == len(zero_points) and set(zero_points) <= inits
    ort.InferenceSession(str(result.file), session_options(ort), providers=["CPUExecutionProvider"])


def test_qdq_export_tells_users_the_session_option(tmp_path, caplog):
    import logging

    from utils.export.onnx_backend import EXACT_INT8_CONFIG

    _qat_checkpoint(tmp_path / "qat.pt")
    caplog.set_level(logging.INFO)
    export_weights(tmp_path / "qat.pt", imgsz=64, check_images=[])
    assert "=".join(EXACT_INT8_CONFIG) in caplog.text and "set it in your own sessions" in caplog.text


def test_openvino_guards_are_exact_and_keep_integer_kernels(exported, tmp_path):
    """--openvino-compat's pass: an identity 1x1 MaxPool on each residual Add's requantized input (a ReLU
    model has no int8 concats); same outputs, every conv and residual Add still integer in onnxruntime;
    a second pass finds nothing left to guard."""
    import onnxruntime as ort

    from quant.qdq_onnx import openvino_guards
    from utils.export.onnx_runtimes import ConvKernels, conv_kernels, ort_optimized_ops

    _, result, model = exported
    guarded = onnx.ModelProto()
    guarded.CopyFrom(model)
    residual = [n for n in model.graph.node if n.op_type == "Add" and "QuantizeLinear" in
                {p.op_type for p in model.graph.node if p.input and p.input[0] == n.output[0]}]
    assert residual and openvino_guards(guarded) == {"residual_adds": len(residual), "int8_concats": 0}
    assert openvino_guards(guarded) == {"residual_adds": 0, "int8_concats": 0}
    onnx.checker.check_model(guarded)
    path = tmp_path / "guarded.onnx"
    onnx.save(guarded, str(path))
    ops = ort_optimized_ops(path)
    assert conv_kernels(ops) == ConvKernels(integer=60, float=0) and ops["QLinearAdd"] == len(residual)
    x = {"images": np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)}
    outputs = [ort.InferenceSession(str(f), session_options(ort), providers=["CPUExecutionProvider"]).run(None, x)[0]
               for f in (result.file, path)]
    assert np.array_equal(*outputs)


def test_ranges_json(exported):
    prepared, result, _ = exported
    ranges = json.loads(result.ranges_file.read_text())
    assert ranges["scheme"] == "pow2-int8"
    inp = ranges["activations"]["act_quant.input"]
    assert inp["dtype"] == "uint8" and inp["scale_exponent"] == -8 and inp["max"] == 255 / 256
    assert inp["onnx_tensors"][0]["float"] == "images"
    fq = prepared.model[0].weight_fake_quant
    w = ranges["weights"]["model.0"]
    assert w["range_exponent"] == [int(v) for v in fq.exponent.tolist()]
    assert w["scale_exponent"] == [int(v) - 7 for v in fq.exponent.tolist()]
    assert w["onnx_weight"] in ranges["tensors"]
    n_act = len({id(q) for n, q in iter_quantizers(prepared) if not n.endswith("weight_fake_quant")})
    assert len(ranges["activations"]) == n_act
    head = ranges["activations"]["model.24.m.0.out_quant"]
    assert head["dtype"] == "int8" and head["onnx_tensors"]


def test_raw_head_dynamic_openvino_compat_export(tmp_path):
    _qat_checkpoint(tmp_path / "qat.pt")
    result = export_weights(tmp_path / "qat.pt", imgsz=64, raw_head=True, dynamic=True, check_images=[],
                            openvino_compat=True)
    assert len(result.checks) == 2 and all(c.passed for c in result.checks)
    assert any(n.op_type == "MaxPool" and "_guard" in n.name for n in onnx.load(str(result.file)).graph.node)
    assert [o.name for o in onnx.load(str(result.file)).graph.output] == ["output0", "output1", "output2"]


def test_qdq_map_matches_pytorch(tmp_path, shared_dir):
    """PTQ of the official yolov5n (SiLU stays float), exported QDQ: val mAP equal within 0.002."""
    import val
    from quant.calibrate import calibrate
    from utils.qat import load_model

    images = sorted((shared_dir / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:32]
    if len(images) < 32:
        raise FileNotFoundError("coco128 not found in the shared folder")
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    data = tmp_path / "data.yaml"
    data.write_text(json.dumps({"path": str(tmp_path), "train": str(listing), "val": str(listing), "nc": 80,
                                "names": [str(i) for i in range(80)]}))
    model, _ = load_model(shared_dir / "weights" / "yolov5n.pt")
    prepared = prepare_qat_model(model, 160)
    from utils.export.onnx_check import sample_batch

    batches = [(sample_batch(images[:4], 4, (160, 160)) * 255).round().to(torch.uint8)]
    calibrate(prepared, batches, 4)
    save_checkpoint(make_checkpoint(prepared, quant=qat_checkpoint_entry(prepared)), tmp_path / "ptq.pt")
    result = export_weights(tmp_path / "ptq.pt", imgsz=160, dynamic=True, check_images=images[:1])  # rect batches as .pt
    kw = dict(data=str(data), batch_size=16, imgsz=160, device="cpu", plots=False, project=tmp_path, workers=0)
    pt = val.run(weights=str(tmp_path / "ptq.pt"), name="pt", **kw)[0]
    ox = val.run(weights=str(result.file), name="onnx", **kw)[0]
    assert pt[2] > 0.05  # a meaningful mAP50, so the comparison says something
    print("mAP50 / mAP50-95: PyTorch", pt[2:4], "ONNX", ox[2:4])
    assert abs(pt[2] - ox[2]) <= 0.002 and abs(pt[3] - ox[3]) <= 0.002


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_prepared_model_equals_its_export_form_exactly(act):
    """Eval-mode QAT model == BN-folded export module, value for value (bias on the int32 grid in both)."""
    from models.yolo import DetectionModel
    from quant.export import convert_for_export

    torch.manual_seed(0)
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act=act), 64).train()
    for _ in range(2):
        prepared(torch.rand(4, 3, 64, 64))
    prepared.eval()
    exported = convert_for_export(prepared)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = prepared(x)[1], exported(x)[1]
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_emits_int_is_the_one_predicate_export_and_bias_rounding_use():
    from quant.config import QuantSpec
    from quant.export import exportable
    from quant.fake_quant import Pow2FakeQuantize
    from quant.fused import quantize_bias

    q8, q16 = Pow2FakeQuantize(QuantSpec(), True), Pow2FakeQuantize(QuantSpec(bits=16), True)
    assert not q8.emits_int()  # not calibrated yet
    for q in (q8, q16):
        q.calibrated.fill_(1)
        q.refresh_host_state()  # a flag buffer written directly: forward's Python copy is told
    assert q8.emits_int() and exportable(q8) and not q16.emits_int() and not exportable(q16)
    q8.enable_fake_quant(False)
    assert not q8.emits_int()
    bias = torch.tensor([0.3])
    assert quantize_bias(bias, q16, q16) is bias  # 16-bit: stays float, as in the exported file


def test_resize_requantization_is_one_pair_per_upsample_and_undoable(exported):
    """The export re-states the grid after each of yolov5n's two nearest upsamples; bench.qdq_resize_ab's
    undo restores the file without them, which still passes the structure check."""
    from bench.qdq_resize_ab import without_resize_requant
    from quant.qdq_onnx import REQUANT_SUFFIX, check_qdq_structure

    _, _, model = exported
    pairs = [n for n in model.graph.node if n.name.endswith(REQUANT_SUFFIX)]
    assert len(pairs) == 2 and all(n.op_type == "QuantizeLinear" for n in pairs)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert all(producer[n.input[0]].op_type == "Resize" for n in pairs)
    undone = without_resize_requant(model)
    assert not any(n.name.endswith(REQUANT_SUFFIX) for n in undone.graph.node)
    assert len(undone.graph.node) == len(model.graph.node) - 4
    assert check_qdq_structure(undone)["aligned_concats"] == check_qdq_structure(model)["aligned_concats"]
