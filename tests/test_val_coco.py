"""val.py --save-json on COCO-format data: pycocotools prints the COCO AP table; without it, one notice."""
from __future__ import annotations

import json
import logging
import sys

import cv2
import numpy as np
import pytest
import yaml

import val


def _coco_subset(root, shared_dir, coco128_yaml, n=8):
    """A dataset whose folder holds annotations/instances_val2017.json for n coco128 images."""
    images = sorted((shared_dir / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:n]
    ids, annotations = val.coco80_to_coco91(), []
    records = []
    for path in images:
        h, w = cv2.imread(str(path)).shape[:2]
        records.append({"id": int(path.stem), "file_name": path.name, "height": h, "width": w})
        label = shared_dir / "datasets" / "coco128" / "labels" / "train2017" / f"{path.stem}.txt"
        rows = np.loadtxt(label, ndmin=2) if label.is_file() else np.zeros((0, 5))
        for cls, x, y, bw, bh in rows:
            box = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": int(path.stem), "category_id": ids[int(cls)],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": records, "annotations": annotations, "categories": [{"id": i, "name": str(i)} for i in ids]}))
    (root / "val.txt").write_text("".join(f"{p}\n" for p in images))
    names = yaml.safe_load(coco128_yaml.read_text())["names"]
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "val.txt", "val": "val.txt", "names": names}))
    return data


def test_save_json_prints_the_coco_table(shared_dir, coco128_yaml, tmp_path, capsys):
    pytest.importorskip("pycocotools")
    data = _coco_subset(tmp_path / "coco", shared_dir, coco128_yaml)
    (_, _, map50, map5095, *_), _, _ = val.run(
        data=data, weights=shared_dir / "weights" / "yolov5n.pt", batch_size=8, imgsz=320, save_json=True,
        workers=0, plots=False, project=tmp_path, name="exp")
    out = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    coco_map = float(out.split("IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")[1].split()[0])
    assert abs(map5095 - coco_map) < 1e-3 and 0.1 < map5095 < map50  # val returns pycocotools' figures
    assert (tmp_path / "exp" / "yolov5n_predictions.json").is_file()


def test_without_pycocotools_a_one_line_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    assert val.score_coco_json(tmp_path / "p.json", tmp_path / "a.json", []) is None
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1 and "pycocotools is not installed" in notices[0] and "\n" not in notices[0]
