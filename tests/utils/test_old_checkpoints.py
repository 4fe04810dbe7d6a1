"""Checkpoints written by earlier code keep loading and scoring exactly as they did.

``tests/data/ckpt_v1_{float,qat}.pt`` were written at commit b4f878c (before the checkpoint reader
was unified), from ``tests/data/ckpt_v1_tiny.yaml`` on the synthetic set below at 64 px:
``train.run(cfg=<tiny yaml>, weights="", epochs=1, batch_size=2, imgsz=64, seed=1, workers=0)`` for the
float file, then ``train.run(weights=<float best.pt>, qat=True, epochs=1, ...)`` for the QAT file
(both ``best.pt``, optimizer stripped). The numbers below are what that code printed and returned.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import val
from quant.config import QuantConfig
from quant.prepare import PreparedModel
from utils.checkpoint import FORMAT, read_checkpoint
from utils.data.synthetic import make_synthetic_dataset
from utils.names import normalise_names
from utils.qat import is_prepared, load_model, qat_checkpoint_entry
from utils.train.loss import ComputeLoss

DATA = Path(__file__).resolve().parents[1] / "data"
NAMES = {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "ring", 5: "star"}
# (sum of decoded outputs, sum of raw head maps) on torch.rand(2, 3, 64, 64) after manual_seed(0), and
# val.run's (P, R, mAP50, mAP50-95, box, obj, cls loss) with a ComputeLoss of the checkpoint's hyp
EXPECTED = {
    "float": (74100.56356370426, -9521.34349441249,
              (0.0, 0.0, 0.0, 0.0, 0.08022332191467285, 0.005994172301143408, 0.035516392439603806)),
    "qat": (74265.56049393362, -9535.90625,
            (0.0, 0.0, 0.0, 0.0, 0.08027394115924835, 0.006017784588038921, 0.035486094653606415)),
}


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("old_ckpt") / "syn", n_train=16, n_val=8, img_size=128)


def _outputs(model) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        decoded, raw = model(x)
    return float(decoded.double().sum()), float(sum(t.double().sum() for t in raw))


@pytest.mark.parametrize("kind", ["float", "qat"])
def test_old_checkpoint_loads_as_before(kind):
    path = DATA / f"ckpt_v1_{kind}.pt"
    assert path.stat().st_size < 300_000
    model, meta = load_model(path)
    assert meta["names"] == NAMES and meta["nc"] == 6 and meta["stride"] == [8.0, 16.0, 32.0]
    assert bool(meta.get("qat")) == (kind == "qat")
    decoded, raw = _outputs(model)
    assert decoded == pytest.approx(EXPECTED[kind][0], rel=1e-6)
    assert raw == pytest.approx(EXPECTED[kind][1], rel=1e-6)


@pytest.mark.parametrize("kind", ["float", "qat"])
def test_old_checkpoint_validates_as_before(kind, data_yaml, tmp_path):
    path = DATA / f"ckpt_v1_{kind}.pt"
    model, _ = load_model(path)
    loss = ComputeLoss(model, hyp=torch.load(path, map_location="cpu", weights_only=True)["hyp"])
    results, _, _ = val.run(str(data_yaml), weights=str(path), imgsz=64, batch_size=4, workers=0, device="cpu",
                            plots=False, project=str(tmp_path), name=kind, compute_loss=loss)
    assert [float(x) for x in results] == pytest.approx(list(EXPECTED[kind][2]), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", ["float", "qat"])
def test_reader_returns_a_typed_record(kind):
    record = read_checkpoint(DATA / f"ckpt_v1_{kind}.pt")
    assert record.format == FORMAT and record.weights == "state_dict" and record.epoch == -1
    assert record.names == NAMES and all(isinstance(k, int) for k in record.names)
    assert record.stride == [8.0, 16.0, 32.0] and record.yaml["nc"] == 6
    assert record.train_state is record.state  # stripped: no separate training weights
    if kind == "qat":
        assert record.quant["version"] == 1 and record.quant["imgsz"] == 64
    else:
        assert record.quant is None


def test_qat_checkpoint_rebuilds_a_prepared_model_that_saves_the_same_entry():
    record = read_checkpoint(DATA / "ckpt_v1_qat.pt")
    model, meta = load_model(record.path)
    assert isinstance(model, PreparedModel) and is_prepared(model) and meta["qat"]
    assert model.example_shape == (1, 3, 64, 64)
    entry = qat_checkpoint_entry(model)
    # the same entry; keys added to the config since (with their defaults) are written out too
    assert {k: v for k, v in entry.items() if k != "config"} == {k: v for k, v in record.quant.items() if k != "config"}
    assert QuantConfig.from_dict(entry["config"]) == QuantConfig.from_dict(record.quant["config"])
    assert not is_prepared(load_model(DATA / "ckpt_v1_float.pt")[0])


def test_normalise_names():
    assert normalise_names(["a", "b"]) == {0: "a", 1: "b"}
    assert normalise_names({"1": "b", 0: "a"}) == {1: "b", 0: "a"}
    assert normalise_names(None) == {} and normalise_names([]) == {}
    with pytest.raises(ValueError, match="data.yaml: class names must be a list or a mapping"):
        normalise_names("abc", "data.yaml")
    with pytest.raises(ValueError, match="keys must be integers"):
        normalise_names({"x": "a"})
