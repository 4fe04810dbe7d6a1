"""detect.py end to end: val.py's boxes, ONNX and QAT models, --compare, videos, lists, refusals."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
import yaml

import detect
import val
from models.yolo import DetectionModel
from utils.checkpoint import make_checkpoint, save_checkpoint
from utils.export.job import export_weights
from utils.qat import prepare_qat_model, qat_checkpoint_entry

REPO = Path(__file__).resolve().parents[1]


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _run(**kwargs) -> Path:
    kwargs.setdefault("device", "cpu")
    return detect.run(**kwargs)


@pytest.fixture(scope="module")
def yolov5n(shared_dir) -> Path:
    return shared_dir / "weights" / "yolov5n.pt"


def test_boxes_equal_val_predictions(yolov5n, shared_dir, coco128_yaml, tmp_path):
    """val.py on a one-image dataset (bus.jpg) and detect.py on bus.jpg write the same label rows."""
    root = tmp_path / "bus"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    shutil.copy(shared_dir / "images" / "bus.jpg", root / "images" / "bus.jpg")
    (root / "labels" / "bus.txt").write_text("5 0.5 0.5 0.8 0.5\n")
    names = yaml.safe_load(coco128_yaml.read_text())["names"]
    data = tmp_path / "bus.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "names": names}))
    thresholds = {"imgsz": 320, "conf_thres": 0.25, "iou_thres": 0.45, "max_det": 1000}
    val.run(data=data, weights=yolov5n, batch_size=1, workers=0, plots=False, save_txt=True, save_conf=True,
            project=tmp_path / "val", name="exp", **thresholds)
    run_dir = _run(weights=yolov5n, source=root / "images" / "bus.jpg", save_txt=True, save_conf=True,
                   project=tmp_path / "detect", **thresholds)
    val_rows = (tmp_path / "val" / "exp" / "labels" / "bus.txt").read_text().splitlines()
    detect_rows = (run_dir / "labels" / "bus.txt").read_text().splitlines()
    assert len(detect_rows) >= 4 and detect_rows == val_rows[::-1]  # upstream writes the last box first
    assert (run_dir / "bus.jpg").is_file() and run_dir == tmp_path / "detect" / "exp"


def test_label_rows_format():
    from utils.detect.output import label_rows

    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0, 0.87654321, 5.0], [0.0, 0.0, 200.0, 100.0, 0.5, 0.0]])
    assert label_rows(boxes, (100, 200, 3)) == ["0 0.5 0.5 1 1", "5 0.15 0.4 0.2 0.4"]
    assert label_rows(boxes, (100, 200, 3), save_conf=True)[1] == "5 0.15 0.4 0.2 0.4 0.876543"


def test_log_lines_labels_and_crops(yolov5n, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = _run(weights=yolov5n, source=str(shared_dir / "images" / "*.jpg"), imgsz=320, save_txt=True,
                   save_crop=True, hide_conf=True, project=tmp_path, name="glob")
    text = caplog.text
    assert f"image 1/2 {shared_dir / 'images' / 'bus.jpg'}: 352x256 " in text and " bus, " in text
    assert "image 2/2 " in text and "per image at shape (1, 3, 352, 256), (1, 3, 224, 352)" in text
    assert "2 labels saved to" in text
    assert all(len(r.split()) == 5 for r in (run_dir / "labels" / "zidane.txt").read_text().splitlines())
    assert (run_dir / "crops" / "person" / "zidane.jpg").is_file() and (run_dir / "zidane.jpg").is_file()


def test_txt_list_classes_and_nosave(yolov5n, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    shutil.copy(shared_dir / "images" / "zidane.jpg", tmp_path / "z.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{shared_dir / 'images' / 'bus.jpg'}\nz.jpg\n")
    run_dir = _run(weights=yolov5n, source=listing, imgsz=256, classes=[5], nosave=True, save_txt=True,
                   project=tmp_path, name="list")
    rows = (run_dir / "labels" / "bus.txt").read_text().splitlines()
    assert rows and all(r.startswith("5 ") for r in rows)
    assert not (run_dir / "labels" / "z.txt").exists() and not (run_dir / "bus.jpg").exists()
    assert "image 2/2 " in caplog.text and "(no detections)" in caplog.text


def _write_video(path: Path, image: Path, frames: int = 5) -> None:
    im = cv2.resize(cv2.imread(str(image)), (240, 320))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (240, 320))
    for i in range(frames):
        writer.write(cv2.flip(im, 1) if i % 2 else im)
    writer.release()


def test_video_source_with_stride(yolov5n, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    video = tmp_path / "clip.mp4"
    _write_video(video, shared_dir / "images" / "bus.jpg")
    run_dir = _run(weights=yolov5n, source=video, imgsz=192, vid_stride=2, save_txt=True,
                   project=tmp_path, name="video")
    assert f"video 1/1 (1/2) {video}: " in caplog.text and "video 1/1 (2/2) " in caplog.text
    assert sorted(p.name for p in (run_dir / "labels").iterdir()) == ["clip_1.txt", "clip_2.txt"]
    cap = cv2.VideoCapture(str(run_dir / "clip.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 2 and cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 240
    cap.release()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, shared_dir):
    """yolov5n.pt with its float ONNX export at 128 px, and a random yolov5p QAT checkpoint (2 classes,
    observers calibrated on random images) with its QDQ ONNX export at 64 px."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copy(shared_dir / "weights" / "yolov5n.pt", folder / "yolov5n.pt")
    export_weights(folder / "yolov5n.pt", imgsz=128, check_images=[])
    torch.manual_seed(0)
    prepared = prepare_qat_model(DetectionModel("yolov5p.yaml", act="relu", nc=2), 64).train()
    for _ in range(2):
        prepared(torch.rand(2, 3, 64, 64))
    save_checkpoint(make_checkpoint(prepared.eval(), quant=qat_checkpoint_entry(prepared)), folder / "qat.pt")
    export_weights(folder / "qat.pt", imgsz=64, check_images=[])
    return folder


def test_compare_float_with_its_onnx_export(tiny_models, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = _run(weights=tiny_models / "yolov5n.pt", compare=tiny_models / "yolov5n.onnx",
                   source=shared_dir / "images" / "bus.jpg", imgsz=128, save_txt=True, project=tmp_path)
    line = next(r.getMessage() for r in caplog.records if "compare: yolov5n.pt" in r.getMessage())
    n = int(line.split("yolov5n.pt: ")[1].split()[0])
    assert n > 0 and f"yolov5n.onnx: {n} boxes, {n} matched" in line, line
    image = cv2.imread(str(run_dir / "bus.jpg"))
    assert image.shape[1] == 2 * 810 + 8 and image.shape[0] > 1080  # two panels, each under a title
    assert "Compare: yolov5n.pt found" in caplog.text and "Compare speed (yolov5n.onnx)" in caplog.text
    assert len((run_dir / "labels" / "bus.txt").read_text().splitlines()) == n  # labels: first model only


def test_qat_checkpoint_and_qdq_onnx_run(tiny_models, shared_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = _run(weights=tiny_models / "qat.pt", compare=tiny_models / "qat.onnx",
                   source=shared_dir / "images" / "zidane.jpg", imgsz=64, conf_thres=0.001, max_det=20,
                   project=tmp_path, name="qdq")
    assert (run_dir / "zidane.jpg").is_file() and "compare: qat.pt: 20 boxes, qat.onnx: 20 boxes" in caplog.text
    with pytest.raises(ValueError, match="--augment"):
        _run(weights=tiny_models / "qat.onnx", source=shared_dir / "images" / "zidane.jpg", imgsz=64,
             augment=True, project=tmp_path, name="aug")


@pytest.mark.parametrize("args, message", [
    (["--source", "0"], "webcam input is not supported"),
    (["--source", "rtsp://example.com/live"], "streams and screen capture are not supported"),
    (["--source", "{tmp}/missing.jpg"], "missing.jpg: source does not exist"),
    (["--source", "{tmp}"], "no images or videos found"),
    (["--view-img"], "--view-img: no display here"),
    (["--vid-stride", "0", "--source", "{tmp}/v.mp4"], "--vid-stride 0: must be at least 1"),
])
def test_refusals_are_one_line(args, message, yolov5n, shared_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    _write_video(tmp_path / "v.mp4", shared_dir / "images" / "bus.jpg", frames=1)
    argv = ["--weights", str(yolov5n), "--source", str(shared_dir / "images" / "bus.jpg"), "--img", "64",
            "--project", str(tmp_path / "runs"), "--device", "cpu"]
    opt = detect.parse_opt(argv + [a.format(tmp=tmp_path) for a in args])
    if "{tmp}" in " ".join(args) and "missing" not in " ".join(args) and "vid" not in " ".join(args):
        (tmp_path / "v.mp4").unlink()  # an empty folder
    assert detect.main(opt) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors


def test_defaults_and_subprocess_refusal(tmp_path):
    opt = detect.parse_opt([])
    assert (opt.conf_thres, opt.iou_thres, opt.imgsz, opt.max_det, opt.line_thickness) == (0.25, 0.45, 640, 1000, 3)
    assert detect.parse_opt(["--img", "320", "320"]).imgsz == 320
    proc = subprocess.run([sys.executable, str(REPO / "detect.py"), "--source", "1", "--project", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "detect.py: error: --source 1: webcam input is not supported" in proc.stderr
