"""The QDQ export's kernel-layout rewrites (quant.qdq_onnx): a space-to-depth stem and head convs padded
to 16 output channels. Both must leave every output bit for bit as the traced graph gives it."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quant.qdq_onnx import CHANNEL_BLOCK, _Graph, _pad_output_channels, _space_to_depth_stem, check_qdq_structure
from utils.export.onnx_backend import session_options


def _qdq_conv_model(kernel: int, stride: int, pad: int, in_c: int = 3, out_c: int = 8, seed: int = 0):
    """images -> Q(uint8, 2^-8) -> DQ -> Conv(int8 per-channel weights, int32 bias) -> Q(int8) -> DQ: the
    shape of a QDQ stem or head conv, with random codes."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array(2.0 ** -8, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(rng.integers(-127, 128, (out_c, in_c, kernel, kernel)).astype(np.int8), "w_codes"),
        numpy_helper.from_array(np.full(out_c, 2.0 ** -7, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(out_c, np.int8), "w_zero"),
        numpy_helper.from_array(rng.integers(-5000, 5000, out_c).astype(np.int32), "b_codes"),
        numpy_helper.from_array(np.full(out_c, 2.0 ** -15, np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(out_c, np.int32), "b_zero"),
        numpy_helper.from_array(np.array(2.0 ** -3, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "x_scale", "x_zero"], ["xq"], name="input_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="input_dq"),
        helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zero"], ["wd"], name="w_dq", axis=0),
        helper.make_node("DequantizeLinear", ["b_codes", "b_scale", "b_zero"], ["bd"], name="b_dq", axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="conv", kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[pad] * 4),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["yq"], name="out_q"),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["out"], name="out_dq"),
    ]
    graph = helper.make_graph(nodes, "qdq_conv", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                [1, in_c, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "c", "oh", "ow"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model, x):
    import onnxruntime as ort

    options = session_options(ort)  # exact 8-bit kernels on every x86 CPU, as the project's sessions
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def _copy(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


@pytest.mark.parametrize("kernel,pad", [(6, 2), (2, 0), (4, 2), (4, 0)])
def test_space_to_depth_stem_is_exact(kernel, pad):
    """An even-kernel stride-2 conv with even pads on the quantized image becomes SpaceToDepth + a half-size
    stride-1 conv; onnxruntime (integer kernels) and its unoptimised reference both give the same values."""
    import onnxruntime as ort

    model = _qdq_conv_model(kernel, 2, pad)
    rewritten = _copy(model)
    assert _space_to_depth_stem(_Graph(rewritten)) == 1
    onnx.checker.check_model(rewritten)
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    assert attrs["kernel_shape"] == [kernel // 2] * 2 and attrs["strides"] == [1, 1] and attrs["pads"] == [pad // 2] * 4
    assert [n.op_type for n in rewritten.graph.node][:3] == ["QuantizeLinear", "SpaceToDepth", "DequantizeLinear"]
    x = np.random.default_rng(1).random((1, 3, 32, 48), dtype=np.float32)
    expected = _run(model, x)
    assert expected.shape[2:] == ((32 + 2 * pad - kernel) // 2 + 1, (48 + 2 * pad - kernel) // 2 + 1)
    assert np.array_equal(_run(rewritten, x), expected)
    reference = ort.InferenceSession(rewritten.SerializeToString(), session_options(ort, optimize=False),
                                     providers=["CPUExecutionProvider"])
    assert np.array_equal(reference.run(None, {"images": x})[0], expected)


@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, 1), (6, 1, 2), (6, 2, 1)])
def test_space_to_depth_stem_leaves_other_convs(kernel, stride, pad):
    """Odd kernels, stride 1 and odd pads have no exact space-to-depth form: the graph is left as it is."""
    model = _qdq_conv_model(kernel, stride, pad)
    before = model.SerializeToString()
    assert _space_to_depth_stem(_Graph(model)) == 0
    assert model.SerializeToString() == before


@pytest.mark.parametrize("out_c", [8, 21, 255])
def test_output_channel_padding_is_exact(out_c):
    """A conv feeding QuantizeLinear -> DequantizeLinear gets zero channels up to a multiple of 16 and a
    Slice keeping the real ones after the DequantizeLinear: same output tensor, same name; already aligned
    convs are untouched; the file still passes the power-of-2 structure check."""
    model = _qdq_conv_model(1, 1, 0, in_c=16, out_c=out_c)
    padded = _copy(model)
    assert _pad_output_channels(_Graph(padded)) == 1
    onnx.checker.check_model(padded)
    g = _Graph(padded)
    assert g.value("w_codes").shape[0] == g.value("b_codes").shape[0] == 16 * -(-out_c // 16)
    assert not g.value("w_codes")[out_c:].any() and not g.value("b_codes")[out_c:].any()
    keep = next(n for n in padded.graph.node if n.op_type == "Slice")
    assert keep.output[0] == "out" and g.producer[keep.input[0]].op_type == "DequantizeLinear"
    check_qdq_structure(padded)
    x = np.random.default_rng(2).random((1, 16, 20, 12), dtype=np.float32)
    assert np.array_equal(_run(padded, x), _run(model, x))
    assert _pad_output_channels(_Graph(padded)) == 0  # now a multiple of CHANNEL_BLOCK
    aligned = _qdq_conv_model(1, 1, 0, in_c=16, out_c=CHANNEL_BLOCK * 2)
    assert _pad_output_channels(_Graph(aligned)) == 0


def test_export_default_and_plain_qdq_agree(tmp_path, shared_dir):
    """export.py's default QDQ file (space-to-depth stem, head padded 21 -> 32 channels) against
    --plain-qdq's on the same checkpoint: onnxruntime gives the same outputs bit for bit, every conv
    still runs on integer kernels, and the plain file has neither rewrite (bench.int8_layout's rebuild of
    the default from it matches)."""
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    from utils.export.job import export_weights
    from utils.export.onnx_check import sample_batch
    from utils.export.onnx_runtimes import ConvKernels, conv_kernels, ort_optimized_ops
    from utils.qat import prepare_qat_model, qat_checkpoint_entry

    torch.manual_seed(0)
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64)
    prepared.train()
    prepared(torch.rand(2, 3, 64, 64))
    prepared.eval()
    save_checkpoint(make_checkpoint(prepared, quant=qat_checkpoint_entry(prepared)), tmp_path / "qat.pt")
    (tmp_path / "plain").mkdir()
    shutil.copy(tmp_path / "qat.pt", tmp_path / "plain" / "qat.pt")
    default = export_weights(tmp_path / "qat.pt", imgsz=64, check_images=[])
    plain = export_weights(tmp_path / "plain" / "qat.pt", imgsz=64, check_images=[], plain_qdq=True)
    assert all(c.passed for c in default.checks + plain.checks)
    models = [onnx.load(str(r.file)) for r in (default, plain)]
    ops = [[n.op_type for n in m.graph.node] for m in models]
    assert ops[0].count("SpaceToDepth") == 1 and ops[0].count("Slice") == 3
    assert "SpaceToDepth" not in ops[1] and "Slice" not in ops[1]
    optimised = ort_optimized_ops(default.file)
    assert conv_kernels(optimised) == ConvKernels(integer=60, float=0)
    assert optimised["Transpose"] == 4  # the image into NHWC and one per head level (Detect's export layout)
    images = [np.random.default_rng(3).random((1, 3, 64, 96), dtype=np.float32),
              sample_batch([shared_dir / "images" / "bus.jpg"], 1, (64, 64)).numpy()]
    for x in images:
        assert np.array_equal(_run(models[0], x), _run(models[1], x))
    # bench.int8_layout rebuilds the default file from the plain one: the same graph
    from bench.int8_layout import DEFAULT, layout_variants

    rebuilt = onnx.load(str(layout_variants(plain.file, tmp_path)[DEFAULT]))
    assert [n.op_type for n in rebuilt.graph.node] == ops[0]
    assert np.array_equal(_run(rebuilt, images[0]), _run(models[0], images[0]))
