"""Tests for models/: yaml building, activations, fuse, TTA and the size summary."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.activations import ACTIVATION_NAMES, activation_name, make_activation
from models.common import C3, Conv, autopad
from models.summary import count_layers, model_info, model_summary
from models.yolo import REGISTRY, Detect, DetectionModel, Model, convert_activation, load_model_yaml

SIZES = "nsmlx"
# parameter counts upstream v7.0 prints for nc=80
EXPECTED = {"n": 1872157, "s": 7235389, "m": 21190557, "l": 46563709, "x": 86749405}


@pytest.fixture(scope="module")
def yolov5n() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n.yaml")


def _acts(model: nn.Module) -> set[type]:
    return {type(m.act) for m in model.modules() if isinstance(m, Conv)}


@pytest.mark.parametrize("size", SIZES)
def test_every_yaml_builds_with_v70_shapes(size):
    model = DetectionModel(f"yolov5{size}.yaml")
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[size]
    assert len(model.model) == 25 and isinstance(model.model[-1], Detect)
    assert model.model[2].type == "models.common.C3" and model.model[24].f == [17, 20, 23]
    assert model.save == [4, 6, 10, 14, 17, 20, 23]
    x = torch.rand(2, 3, 64, 96)
    train_out = model.train()(x)
    assert [tuple(t.shape) for t in train_out] == [(2, 3, 8, 12, 85), (2, 3, 4, 6, 85), (2, 3, 2, 3, 85)]
    with torch.no_grad():
        boxes, raw = model.eval()(x)
    assert boxes.shape == (2, 3 * (96 + 24 + 6), 85) and len(raw) == 3
    # decoded centres lie (roughly) inside the image, sizes positive, scores in [0, 1]
    assert boxes[..., :2].min() > -40 and boxes[..., 0].max() < 96 + 40
    assert (boxes[..., 2:4] > 0).all() and boxes[..., 4:].min() >= 0 and boxes[..., 4:].max() <= 1


def test_model_alias_names_and_state_dict_keys(yolov5n):
    assert Model is DetectionModel
    assert yolov5n.names == {i: str(i) for i in range(80)}
    keys = yolov5n.state_dict().keys()
    for key in ("model.0.conv.weight", "model.2.m.0.cv1.bn.running_mean", "model.24.m.0.weight",
                "model.24.anchors", "model.9.cv2.bn.weight"):
        assert key in keys
    # anchors stored in grid units: P3 anchors / 8
    assert torch.allclose(yolov5n.model[-1].anchors[0], torch.tensor([[10, 13], [16, 30], [33, 23]]) / 8)


def test_bias_init_matches_upstream_prior():
    torch.manual_seed(0)
    plain = Detect(80, [[10, 13, 16, 30, 33, 23]] * 3, (64, 128, 256))
    model = DetectionModel("yolov5n.yaml")
    head = model.model[-1]
    b = head.m[0].bias.view(3, -1)
    obj_shift = torch.log(torch.tensor(8 / (640 / 8) ** 2))
    # default conv bias init is within +-1/sqrt(fan_in); the prior shifts it far below that band
    assert (b[:, 4] - obj_shift).abs().max() < 1 / 64 ** 0.5 + 1e-6
    assert b[:, 5:].mean() < -4 and plain.m[0].bias.abs().max() < 1


def test_bn_and_activation_init(yolov5n):
    bns = [m for m in yolov5n.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == 0.03 for m in bns)
    acts = [m.act for m in yolov5n.modules() if isinstance(m, Conv)]
    assert all(isinstance(a, nn.SiLU) and a.inplace for a in acts)
    assert len({id(a) for a in acts}) == len(acts)  # one instance per block, never shared


@pytest.mark.parametrize("spec,cls", [("relu", nn.ReLU), ("ReLU6", nn.ReLU6), ("nn.SiLU()", nn.SiLU),
                                      ("nn.ReLU()", nn.ReLU), ("torch.nn.ReLU6()", nn.ReLU6)])
def test_make_activation_spellings(spec, cls):
    act = make_activation(spec)
    assert type(act) is cls and act.inplace
    assert make_activation(spec) is not act


def test_make_activation_special_values_and_errors():
    assert isinstance(make_activation(None), nn.SiLU) and isinstance(make_activation(True), nn.SiLU)
    assert isinstance(make_activation(False), nn.Identity)
    mod = nn.ReLU()
    assert make_activation(mod) is mod
    assert make_activation("nn.LeakyReLU(0.2)").negative_slope == pytest.approx(0.2)
    assert activation_name(nn.LeakyReLU(0.2)) == "leakyrelu(0.2)"
    assert activation_name(nn.ReLU6()) == "relu6" and "relu" in ACTIVATION_NAMES
    with pytest.raises(ValueError, match="unknown activation 'gelu'.*silu"):
        make_activation("gelu")
    with pytest.raises(ValueError):
        make_activation(3)


def test_activation_choice_is_per_model(tmp_path):
    relu = DetectionModel("yolov5n.yaml", act="relu")
    assert _acts(relu) == {nn.ReLU} and relu.yaml["activation"] == "relu"
    silu = DetectionModel("yolov5n.yaml")
    assert _acts(silu) == {nn.SiLU} and "activation" not in silu.yaml
    cfg, _ = load_model_yaml("yolov5n.yaml")
    cfg["activation"] = "nn.ReLU6()"
    from_yaml = DetectionModel(cfg)
    assert _acts(from_yaml) == {nn.ReLU6} and from_yaml.yaml["activation"] == "relu6"
    assert _acts(DetectionModel(cfg, act="silu")) == {nn.SiLU}  # argument beats yaml key
    assert _acts(DetectionModel("yolov5n.yaml")) == {nn.SiLU}
    # a yaml row that passes act explicitly keeps it
    assert isinstance(C3(8, 8, act=False).cv1.act, nn.Identity)


def test_unknown_module_refused(tmp_path):
    cfg, _ = load_model_yaml("yolov5n.yaml")
    cfg["head"][3] = [-1, 3, "C4", [512, False]]
    path = tmp_path / "bad.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"bad\.yaml: layer 13 uses unknown module 'C4'"):
        DetectionModel(path)
    cfg["head"][3] = [-1, 3, "__import__('os').system", ["ls"]]
    with pytest.raises(ValueError, match="unknown module"):
        DetectionModel(cfg)
    assert "Conv" in REGISTRY and "nn.Upsample" in REGISTRY
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        DetectionModel(tmp_path / "nope.yaml")


def test_nc_and_anchor_count_overrides():
    model = DetectionModel("yolov5n.yaml", nc=3)
    assert model.model[-1].no == 8 and model.yaml["nc"] == 3 and len(model.names) == 3
    cfg, _ = load_model_yaml("yolov5n.yaml")
    cfg["anchors"] = 2
    two = DetectionModel(cfg)
    assert two.model[-1].na == 2 and two.model[-1].anchors.shape == (3, 2, 2)


def test_reversed_anchors_are_flipped():
    cfg, _ = load_model_yaml("yolov5n.yaml")
    cfg["anchors"] = cfg["anchors"][::-1]
    model = DetectionModel(cfg)
    pixels = model.model[-1].anchors * model.stride.view(-1, 1, 1)
    assert torch.allclose(pixels[0], torch.tensor([[10.0, 13], [16, 30], [33, 23]]))


def test_convert_activation_leaves_no_silu():
    model = DetectionModel("yolov5n.yaml")
    convert_activation(model, "relu")
    assert not any(isinstance(m, nn.SiLU) for m in model.modules())
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert all(type(a) is nn.ReLU for a in acts) and len({id(a) for a in acts}) == len(acts)
    assert model.yaml["activation"] == "relu"
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 64))


def test_fuse_matches_unfused():
    torch.manual_seed(1)
    model = DetectionModel("yolov5n.yaml").eval()
    for m in model.modules():  # non-trivial BN statistics so folding is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)[0]
        model.fuse()
        after = model(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(isinstance(m.bn, nn.Identity) and m.conv.bias is not None
               for m in model.modules() if isinstance(m, Conv))
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-3)
    assert "forward" not in vars(model.model[0])  # no per-instance forward patching


def test_export_raw_returns_head_maps(yolov5n):
    head = yolov5n.model[-1]
    x = torch.rand(1, 3, 64, 64)
    try:
        head.export_raw = True
        with torch.no_grad():
            raw = yolov5n.eval()(x)
    finally:
        head.export_raw = False
    assert isinstance(raw, list) and raw[0].shape == (1, 3, 8, 8, 85)


def test_tta_output(yolov5n):
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = yolov5n.eval()(x)[0]
        tta, extra = yolov5n(x, augment=True)
    assert extra is None and tta.shape[-1] == 85
    # scale 1 without its P5 level (3*2*2=12 rows), scale 0.83 -> 64px all levels, 0.67 -> 64px minus P3
    assert tta.shape[1] == (plain.shape[1] - 12) + plain.shape[1] + (plain.shape[1] - 3 * 8 * 8)
    assert torch.isfinite(tta).all()


def test_autopad():
    assert autopad(3) == 1 and autopad(6, 2) == 2 and autopad(3, d=2) == 2 and autopad([3, 5]) == [1, 2]


def test_model_info_yolov5s():
    model = DetectionModel("yolov5s.yaml")
    info = model_info(model, imgsz=640)
    assert info["parameters"] == 7235389 and info["gradients"] == 7235389
    assert info["layers"] == 214
    assert abs(info["gflops"] - 16.5) < 0.1
    assert model_summary(model, info).startswith("YOLOv5s summary: 214 layers, 7235389 parameters")
    model.eval().fuse()
    fused = model_info(model)
    assert fused["layers"] == 157 and fused["parameters"] == 7225885
    assert abs(fused["gflops"] - 16.4) < 0.1 and fused["gflops"] < info["gflops"]
    assert count_layers(nn.Sequential(nn.Conv2d(1, 1, 1), nn.SiLU(), nn.SiLU())) == 3


def test_fx_traces_train_and_export_raw_modes(yolov5n):
    import torch.fx as fx
    x = torch.rand(1, 3, 64, 64)
    head = yolov5n.model[-1]
    try:
        for training, raw in ((True, False), (False, True)):
            yolov5n.train(training)
            head.export_raw = raw
            graph = fx.symbolic_trace(yolov5n, concrete_args={"augment": False})
            with torch.no_grad():
                expected, got = yolov5n(x), graph(x)
            assert all(torch.equal(a, b) for a, b in zip(expected, got))
    finally:
        head.export_raw = False
        yolov5n.eval()
