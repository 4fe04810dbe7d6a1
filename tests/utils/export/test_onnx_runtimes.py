"""utils.export.onnx_runtimes: onnxruntime op counting, head values read back from decoded outputs, agreement maths."""
from __future__ import annotations

import numpy as np
import pytest

from bench.openvino_repros import bias_broadcast, residual_add
from utils.export.onnx_runtimes import (ConvKernels, StepAgreement, conv_kernels, decoded_levels, head_codes,
                                 match_after_nms, onnxruntime_runner, openvino_runner, ort_optimized_ops,
                                 step_agreement)

STRIDES = [8, 16, 32]
ANCHORS = [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]], [[116, 90], [156, 198], [373, 326]]]


def _decode(codes: list[np.ndarray], step: float) -> np.ndarray:
    """v7.0 decoding in float32, as the exported graph computes it."""
    rows = []
    for i, c in enumerate(codes):
        bs, na, ny, nx, no = c.shape
        sig = (1 / (1 + np.exp(-(c * step)))).astype(np.float32)
        gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        grid = np.stack((gx, gy), -1).astype(np.float32) - 0.5
        anchor = np.asarray(ANCHORS[i], np.float32).reshape(1, na, 1, 1, 2)
        xy = (sig[..., :2] * 2 + grid) * np.float32(STRIDES[i])
        wh = (sig[..., 2:4] * 2) ** 2 * anchor
        rows.append(np.concatenate((xy, wh, sig[..., 4:]), -1).reshape(bs, -1, no))
    return np.concatenate(rows, 1)


@pytest.mark.parametrize("hw", [(64, 96), (640, 640)])
def test_head_codes_invert_float32_decoding_exactly(hw):
    rng = np.random.default_rng(0)
    codes = [rng.integers(-128, 128, (2, 3, hw[0] // s, hw[1] // s, 7)) for s in STRIDES]
    back = head_codes(_decode(codes, 1 / 16), STRIDES, ANCHORS, hw, [1 / 16] * 3)
    for a, b in zip(codes, back):
        assert np.array_equal(a, b)


def test_decoded_levels_refuse_a_mismatched_size():
    with pytest.raises(ValueError, match="rows"):
        decoded_levels(np.zeros((1, 10, 7)), STRIDES, 3, (64, 64))


def test_step_agreement():
    a = [np.array([0, 1, 2, 3]), np.array([[5, 5]])]
    b = [np.array([0, 2, 5, 3]), np.array([[5, 4]])]
    assert step_agreement(a, b) == StepAgreement(max_steps=3, over_one=1 / 6, differ=3 / 6, values=6)
    assert step_agreement([], []) == StepAgreement(0, 0.0, 0.0, 0)


def test_match_after_nms_pairs_identical_outputs():
    out = np.zeros((1, 4, 7), np.float32)
    out[0, :2, :4] = [[20, 20, 10, 10], [50, 50, 12, 12]]
    out[0, :2, 4] = 0.9
    out[0, :2, 5] = 0.8
    assert match_after_nms(out, out.copy()) == [(2, 2, 2)]
    shifted = out.copy()
    shifted[0, 1, :2] += 40  # second box moves away
    assert match_after_nms(out, shifted) == [(2, 2, 1)]


def test_onnxruntime_fuses_the_qdq_conv_and_counts_it(tmp_path):
    model, _, _, _ = residual_add()
    path = tmp_path / "residual_add.onnx"
    path.write_bytes(model.SerializeToString())
    ops = ort_optimized_ops(path)
    assert conv_kernels(ops) == ConvKernels(integer=1, float=0) and ops["QLinearConv"] == 1


@pytest.mark.parametrize("optimize", [True, False])
def test_onnxruntime_runner_matches_the_specification(tmp_path, optimize):
    model, inputs, reference, _ = bias_broadcast()
    path = tmp_path / "bias_broadcast.onnx"
    path.write_bytes(model.SerializeToString())
    assert np.array_equal(onnxruntime_runner(path, optimize)(inputs["x"]), reference(inputs))


def test_float_convs_are_counted_as_float():
    from collections import Counter

    assert conv_kernels(Counter({"Conv": 2, "FusedConv": 1, "QLinearConv": 4})) == ConvKernels(4, 3)


def test_openvino_runner_is_none_without_openvino(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    assert openvino_runner(tmp_path / "missing.onnx") is None
