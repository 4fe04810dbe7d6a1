"""Robustness of label contents: a dataset mixing polygon (segment) rows and box rows trains, with box
warping for the targets without a polygon; NaN/inf label values are skipped and named like other bad rows."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import train
from utils.data.augment import random_perspective
from utils.data.dataset import LoadImagesAndLabels
from utils.data.label_scan import default_cache_path, find_image_files, img2label_paths, scan_labels
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]
HYP = yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=8, n_val=4, img_size=96).parent


@pytest.fixture()
def ds(tmp_path, pristine) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    data = yaml.safe_load((root / "synthetic.yaml").read_text())
    data["path"] = str(root)
    data.pop("synthetic", None)
    (root / "synthetic.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def _as_polygons(label_file: Path) -> None:
    """Rewrite a label file's box rows as 5-point polygons (YOLOv5's segment format)."""
    rows = []
    for line in label_file.read_text().splitlines():
        c, x, y, w, h = map(float, line.split())
        x0, y0, x1, y1 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
        pts = [x0, y0, x, y0, x1, y0, x1, y1, x0, y1]
        rows.append(" ".join([str(int(c))] + [f"{v:.6f}" for v in pts]))
    label_file.write_text("\n".join(rows) + "\n")


def _mix(root: Path) -> int:
    """Every other non-empty training label file in polygon form; returns how many were converted."""
    files = sorted(f for f in (root / "labels" / "train").glob("*.txt") if f.read_text().strip())
    for f in files[::2]:
        _as_polygons(f)
    return len(files[::2])


# --------------------------------------------------------------------------------- mixed formats
def test_random_perspective_warps_boxes_of_targets_without_polygon():
    im = np.zeros((200, 200, 3), np.uint8)
    targets = np.array([[0, 20, 20, 80, 80], [1, 100, 100, 180, 160]], dtype=np.float32)
    square = np.array([[20, 20], [80, 20], [80, 80], [20, 80]], dtype=np.float32)
    mixed = [square, np.zeros((0, 2), np.float32)]
    kw = dict(degrees=10, translate=0.1, scale=0.2, shear=2)  # each call draws the same warp from its seed
    _, out = random_perspective(im, targets.copy(), mixed, rng=random.Random(3), **kw)
    _, boxes_only = random_perspective(im, targets.copy(), (), rng=random.Random(3), **kw)
    _, polys_only = random_perspective(im, targets[:1].copy(), [square], rng=random.Random(3), **kw)
    assert len(out) == 2
    np.testing.assert_allclose(out[1], boxes_only[1], atol=1e-4)  # box warping for the box target
    np.testing.assert_allclose(out[0], polys_only[0], atol=1e-4)  # polygon warping for the polygon


def test_mixed_polygon_and_box_dataset_mosaics(ds):
    assert _mix(ds) >= 2
    dataset = LoadImagesAndLabels(str(ds / "images" / "train"), img_size=64, augment=True,
                                  hyp={**HYP, "mosaic": 1.0, "mixup": 0.5})
    assert any(len(s) for s in dataset.segments) and any(len(lb) and not len(s) for lb, s in
                                                         zip(dataset.labels, dataset.segments))
    random.seed(0)
    np.random.seed(0)
    for i in range(len(dataset)):
        img, labels, _, _ = dataset[i]
        assert img.shape[-2:] == (64, 64) and np.isfinite(labels.numpy()).all()


def test_mixed_polygon_and_box_dataset_trains(tmp_path, ds):
    _mix(ds)
    results = train.run(data=str(ds / "synthetic.yaml"), cfg="yolov5p.yaml", weights="", imgsz=64, epochs=1,
                        batch_size=4, workers=0, device="cpu", project=str(tmp_path / "runs"), noplots=True)
    assert len(results) == 7


# ------------------------------------------------------------------------------------ NaN labels
def _scan(folder: Path) -> dict:
    im_files = find_image_files(folder)
    label_files = img2label_paths(im_files)
    return scan_labels(im_files, label_files, default_cache_path(folder, label_files), workers=1)


@pytest.mark.parametrize("row", ["0 0.5 nan 0.2 0.2", "0 0.5 0.5 inf 0.2", "nan 0.5 0.5 0.2 0.2",
                                 "0 0.1 0.1 0.2 0.1 nan 0.3 0.1 0.3"])
def test_non_finite_label_values_skip_the_file_and_name_it(ds, caplog, row):
    im = sorted((ds / "images" / "train").iterdir())[0]
    lb = ds / "labels" / "train" / (im.stem + ".txt")
    lb.write_text("1 0.5 0.5 0.2 0.2\n" + row + "\n" if len(row.split()) == 5 else row + "\n")
    caplog.set_level(logging.INFO)
    scan = _scan(ds / "images" / "train")
    assert str(im) not in scan["im_files"] and scan["nc"] == 1
    named = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and str(lb) in r.getMessage()]
    assert len(named) == 1 and "non-finite label values" in named[0]
    assert all(np.isfinite(x).all() for x in scan["labels"])
