"""bench/openvino_repros.py: each model is valid ONNX, onnxruntime computes what the numpy reference of the
specification computes, and each is sensitive to the shortcut OpenVINO takes (so the repro can show it)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bench.openvino_repros import REPROS, bias_broadcast, int8_concat, residual_add, run, steps_off


def _ort(model, inputs, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


@pytest.mark.parametrize("name", sorted(REPROS))
@pytest.mark.parametrize("optimize", [True, False])
def test_onnxruntime_equals_the_reference(name, optimize):
    model, inputs, reference, step = REPROS[name]()
    onnx.checker.check_model(model)
    assert len(model.SerializeToString()) < 4096  # a few nodes and small tensors
    assert steps_off(_ort(model, inputs, optimize), reference(inputs), step) == (0.0, 0.0)


def test_bias_broadcast_repro_has_distinct_biases():
    """OpenVINO's answer (channel 0's bias added to every channel) differs from the right one."""
    model, inputs, reference, step = bias_broadcast()
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    bias = init["b"].astype(np.float64) * init["b_scale"]
    assert len(set(bias.tolist())) == len(bias)
    right = reference(inputs)
    shifted = (right.reshape(1, 6, 4, 4) + (bias[0] - bias).reshape(1, -1, 1, 1)).reshape(right.shape)
    assert right.shape == (1, 2, 3, 4, 4) and steps_off(shifted, right, step)[0] > 50


def test_residual_add_repro_has_ties_that_single_rounding_changes():
    """Rounding once after the Add (OpenVINO's fusion) differs from the specification on >5% of values."""
    model, inputs, reference, _ = residual_add()
    right = reference(inputs)
    x = inputs["x"].astype(np.float64)
    init = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    acc = np.einsum("oc,nchw->nohw", init["w"][:, :, 0, 0] * init["w_scale"][:, None], x * init["x_scale"])
    acc += (init["b"] * init["b_scale"]).reshape(1, -1, 1, 1)
    once = np.clip(np.rint(np.maximum(acc, 0) / init["s"] + inputs["residual"]), 0, 255)
    assert np.mean(once != right) > 0.05


def test_int8_concat_repro_uses_negative_values():
    _, inputs, _, _ = int8_concat()
    assert all((v < 0).mean() > 0.3 for v in inputs.values())


def test_run_without_openvino_prints_onnxruntime_only(capsys, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "openvino" else real_import(name, *a, **k))
    results = run(save=str(tmp_path))
    assert set(results) == set(REPROS) and all(r == {"onnxruntime": (0.0, 0.0)} for r in results.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.onnx" for n in REPROS)
    assert "openvino: not installed" in capsys.readouterr().out


@pytest.mark.parametrize("name, kind", [("residual_add", "residual_adds"), ("int8_concat", "int8_concats")])
def test_openvino_guards_on_the_repros_change_nothing_in_onnxruntime(name, kind):
    from quant.qdq_onnx import openvino_guards

    model, inputs, reference, _ = REPROS[name]()
    counts = openvino_guards(model)
    assert counts[kind] == 1 and sum(counts.values()) == 1
    onnx.checker.check_model(model)
    assert np.array_equal(_ort(model, inputs), reference(inputs))
    assert openvino_guards(model) == {"residual_adds": 0, "int8_concats": 0}  # nothing left to guard
