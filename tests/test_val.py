"""val.py end to end: upstream v7.0 figures on coco128, bad input, optional torchvision."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import utils.data.dataset as dataset_module
import val
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
ORDER_FILE = Path(__file__).parent / "data" / "coco128_rect_order_numpy126.json"

# Upstream v7.0 val.py, batch 32, 640, CPU: (P, R, mAP50, mAP50-95) from ../shared/CONTEXT.md.
UPSTREAM = {"yolov5n.pt": (0.624, 0.482, 0.552, 0.353), "yolov5s.pt": (0.650, 0.552, 0.620, 0.419)}


@pytest.fixture
def upstream_rect_order(monkeypatch):
    """Break aspect-ratio ties as the reference run did (numpy 1.26's sort kernel; see dataset.py)."""
    order = np.asarray(json.loads(ORDER_FILE.read_text())["order"])
    monkeypatch.setattr(dataset_module, "aspect_ratio_order", lambda ar: order.copy())


@pytest.mark.parametrize("weights", ["yolov5n.pt", "yolov5s.pt"])
def test_official_weights_match_upstream_on_coco128(weights, shared_dir, coco128_yaml, tmp_path,
                                                    upstream_rect_order):
    (p, r, map50, map5095, *_), maps, _ = val.run(
        data=coco128_yaml, weights=shared_dir / "weights" / weights, batch_size=32, imgsz=640,
        project=tmp_path, name="exp", plots=False, workers=0)
    _, _, up50, up5095 = UPSTREAM[weights]
    assert abs(map5095 - up5095) <= 0.002, (map5095, up5095)
    assert abs(map50 - up50) <= 0.004, (map50, up50)
    assert maps.shape == (80,)


def test_val_writes_plots_txt_and_json(shared_dir, coco128_yaml, tmp_path):
    (_, _, map50, _, *_), _, speeds = val.run(
        data=coco128_yaml, weights=shared_dir / "weights" / "yolov5n.pt", batch_size=64, imgsz=320,
        project=tmp_path, name="exp", save_txt=True, save_conf=True, save_json=True, workers=0)
    run_dir = tmp_path / "exp"
    for name in ("confusion_matrix.png", "PR_curve.png", "F1_curve.png", "val_batch0_pred.jpg",
                 "yolov5n_predictions.json"):
        assert (run_dir / name).is_file(), name
    records = json.loads((run_dir / "yolov5n_predictions.json").read_text())
    assert records and {"image_id", "category_id", "bbox", "score"} <= set(records[0])
    rows = (run_dir / "labels" / "000000000009.txt").read_text().split("\n")
    assert len(rows[0].split()) == 6  # class, xywh, conf
    assert 0.2 < map50 < 0.6 and len(speeds) == 3


def _tiny_dataset_with_bad_files(root: Path) -> Path:
    yaml_file = make_synthetic_dataset(root, n_train=4, n_val=12, img_size=128, seed=3)
    images, labels = root / "images" / "val", root / "labels" / "val"
    good = sorted(images.glob("*.jpg"))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    (labels / "corrupt.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    data = good[0].read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (labels / "truncated.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    cv2.imwrite(str(images / "badrow.jpg"), cv2.imread(str(good[1])))
    (labels / "badrow.txt").write_text("0 0.5 0.5 0.2\n")
    return yaml_file


def test_bad_images_and_labels_are_named_and_skipped(tmp_path, shared_dir, caplog):
    yaml_file = _tiny_dataset_with_bad_files(tmp_path / "synth")
    n_good = len(list((tmp_path / "synth" / "images" / "val").glob("*.jpg"))) - 3
    results, _, _ = val.run(data=yaml_file, weights=shared_dir / "weights" / "yolov5n.pt",
                            batch_size=8, imgsz=128, project=tmp_path, name="exp", plots=False,
                            workers=0, single_cls=True)
    log = caplog.text
    for name in ("corrupt.jpg", "truncated.jpg", "badrow.txt"):
        assert name in log, f"{name} not reported"
    kept = dataset_module.LoadImagesAndLabels(str(tmp_path / "synth" / "images" / "val"), 128, 8)
    assert len(kept) == n_good and not any(Path(f).stem in ("corrupt", "truncated", "badrow") for f in kept.im_files)
    assert len(results) == 7


def _run_cli(args, cwd=REPO):
    return subprocess.run([sys.executable, "val.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_refuses_checkpoint_with_foreign_global(tmp_path, coco128_yaml):
    import os

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)  # torch.save pickles; loading it unchecked would run the command
    out = _run_cli(["--weights", str(bad), "--data", str(coco128_yaml), "--project", str(tmp_path)])
    assert out.returncode == 1
    text = out.stderr + out.stdout
    assert "evil.pt" in text and "system" in text and "refused" in text
    assert "Traceback" not in out.stderr
    assert not marker.exists()


def test_cli_missing_weights_is_one_line(tmp_path, coco128_yaml):
    out = _run_cli(["--weights", str(tmp_path / "nope.pt"), "--data", str(coco128_yaml),
                    "--project", str(tmp_path)])
    assert out.returncode == 1 and "nope.pt" in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_broken_torchvision_gives_same_results(tmp_path, shared_dir, coco128_yaml):
    """A torchvision that raises RuntimeError at import (CUDA wheel beside CPU torch) is tolerated."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = ("import sys, val; from utils.log import setup_logging; setup_logging();"
            "r = val.run(data=sys.argv[1], weights=sys.argv[2], imgsz=160, batch_size=64, plots=False,"
            " workers=0, project=sys.argv[3]); print('RESULT', r[0][:4])")
    args = [str(coco128_yaml), str(shared_dir / "weights" / "yolov5n.pt"), str(tmp_path)]
    env_broken = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "fake")}
    broken = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env_broken,
                            capture_output=True, text=True, timeout=300)
    plain = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert broken.returncode == 0, broken.stderr[-2000:]
    line = [x for x in broken.stdout.splitlines() if x.startswith("RESULT")]
    assert line and line == [x for x in plain.stdout.splitlines() if x.startswith("RESULT")]


def test_channels_last_validates_to_the_same_map(tmp_path, shared_dir, coco128_yaml):
    """--memory-format channels_last (auto picks it on CUDA) changes only float rounding, not the scores."""
    kw = dict(data=str(coco128_yaml), weights=str(shared_dir / "weights" / "yolov5n.pt"), imgsz=160,
              batch_size=64, plots=False, workers=0, device="cpu", project=str(tmp_path))
    nchw = val.run(**kw, memory_format="contiguous")[0][:4]
    nhwc = val.run(**kw, memory_format="channels_last")[0][:4]
    assert nchw[3] > 0.05 and nchw != nhwc  # different kernels really ran
    assert all(abs(a - b) < 2e-3 for a, b in zip(nchw, nhwc)), (nchw, nhwc)
