"""Tests for utils.data.synthetic: determinism, label validity, tight boxes, idempotence."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from utils.data import synthetic
from utils.data.synthetic import (CLASS_NAMES, ensure_synthetic_dataset, make_synthetic_dataset,
                             render_sample)

SMALL = {"n_train": 14, "n_val": 4, "img_size": 128}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".jpg", ".txt")}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "synthetic"
    make_synthetic_dataset(root, seed=3, **SMALL)
    return root


def test_layout_counts_and_yaml(small_dataset: Path) -> None:
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        images = sorted((small_dataset / "images" / split).glob("*.jpg"))
        labels = sorted((small_dataset / "labels" / split).glob("*.txt"))
        assert len(images) == n and len(labels) == n
        assert [p.stem for p in images] == [p.stem for p in labels]
    data = yaml.safe_load((small_dataset / "synthetic.yaml").read_text())
    assert Path(data["path"]) == small_dataset.resolve()
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == dict(enumerate(CLASS_NAMES))
    manifest = json.loads((small_dataset / "synthetic.json").read_text())
    assert manifest["complete"] is True and manifest["seed"] == 3


def test_labels_valid_and_images_readable(small_dataset: Path) -> None:
    n_boxes, n_empty, shapes = 0, 0, set()
    for lbl in sorted((small_dataset / "labels").rglob("*.txt")):
        img = cv2.imread(str(small_dataset / "images" / lbl.parent.name / f"{lbl.stem}.jpg"))
        assert img is not None and max(img.shape[:2]) == SMALL["img_size"]
        shapes.add(img.shape[:2])
        rows = np.loadtxt(lbl, ndmin=2).reshape(-1, 5) if lbl.read_text().strip() else \
            np.zeros((0, 5))
        n_empty += len(rows) == 0
        n_boxes += len(rows)
        assert len(rows) <= 6
        assert np.all(rows[:, 0] == rows[:, 0].round()) and np.all(rows[:, 0] < len(CLASS_NAMES))
        cx, cy, w, h = rows[:, 1:].T
        assert np.all((w > 0) & (h > 0))
        assert np.all(cx - w / 2 >= -1e-6) and np.all(cx + w / 2 <= 1 + 1e-6)
        assert np.all(cy - h / 2 >= -1e-6) and np.all(cy + h / 2 <= 1 + 1e-6)
    assert n_boxes > 20
    assert n_empty >= 1  # background-only images exist (index 11 of train is one)
    assert len(shapes) > 1  # not all images share one size, so rect batching is exercised


@pytest.mark.parametrize("index", range(8))
def test_boxes_are_tight_around_masks(index: int) -> None:
    sample = render_sample(seed=5, split="train", index=index, img_size=160)
    h, w = sample.image.shape[:2]
    assert len(sample.labels) == len(sample.masks)
    for row, mask in zip(sample.labels, sample.masks):
        _, cx, cy, bw, bh = row
        x0, x1 = round((cx - bw / 2) * w), round((cx + bw / 2) * w)
        y0, y1 = round((cy - bh / 2) * h), round((cy + bh / 2) * h)
        ys, xs = np.nonzero(mask)
        assert xs.size >= 20
        # every drawn pixel is inside the box, and the box touches the mask on all four sides
        assert xs.min() == x0 and xs.max() == x1 - 1
        assert ys.min() == y0 and ys.max() == y1 - 1
        # sizes stay within the intended range (clipping can only shrink a box)
        assert max(x1 - x0, y1 - y0) <= 0.5 * min(h, w) + 2
    assert not np.any(sample.masks.sum(axis=0) > 1)  # visible masks never share a pixel


def test_shape_pixels_differ_from_background() -> None:
    sample = render_sample(seed=1, split="val", index=0, img_size=128)
    assert len(sample.labels) > 0
    mask = sample.masks[0]
    inside = sample.image[mask].astype(np.float64).mean(axis=0)
    outside = sample.image[~sample.masks.any(axis=0)].astype(np.float64).mean(axis=0)
    assert np.abs(inside - outside).max() > 10


def test_deterministic_bytes_per_seed(tmp_path: Path) -> None:
    kw = {"n_train": 5, "n_val": 2, "img_size": 96}
    make_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    make_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert len(a) == 14 and a == b
    assert a != c


def test_idempotent_then_overwrite(tmp_path: Path) -> None:
    kw = {"n_train": 3, "n_val": 2, "img_size": 96}
    yaml_path = make_synthetic_dataset(tmp_path, **kw)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    old = 1_000_000_000  # far in the past: any rewrite would bump the mtime
    for p in files:
        os.utime(p, ns=(old, old))
    assert make_synthetic_dataset(tmp_path, **kw) == yaml_path
    assert ensure_synthetic_dataset(tmp_path) == yaml_path  # accepts whatever is there
    assert all(p.stat().st_mtime_ns == old for p in files)
    make_synthetic_dataset(tmp_path, overwrite=True, **kw)
    assert all(p.stat().st_mtime_ns != old for p in files)


def test_parameter_change_regenerates(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, n_train=4, n_val=2, img_size=96)
    (tmp_path / "labels" / "train.cache").write_text("stale")
    ensure_synthetic_dataset(tmp_path, n_train=2, n_val=2, img_size=96)
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 2
    assert not (tmp_path / "labels" / "train.cache").exists()
    # an interrupted run (manifest not complete) is redone on next use
    manifest = tmp_path / "synthetic.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    first = tmp_path / "images" / "train" / "train_000000.jpg"
    os.utime(first, ns=(1, 1))
    ensure_synthetic_dataset(tmp_path)  # keeps the recorded parameters when redoing
    assert json.loads(manifest.read_text()) == {"version": 1, "n_train": 2, "n_val": 2,
                                                "img_size": 96, "seed": 0, "complete": True}
    assert first.stat().st_mtime_ns != 1


def test_refuses_foreign_folder_and_bad_args(tmp_path: Path) -> None:
    foreign = tmp_path / "images" / "train"
    foreign.mkdir(parents=True)
    (foreign / "mine.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="synthetic manifest"):
        make_synthetic_dataset(tmp_path, n_train=2, n_val=1, img_size=96)
    assert (foreign / "mine.jpg").exists()
    with pytest.raises(ValueError, match="n_val"):
        make_synthetic_dataset(tmp_path / "x", n_train=2, n_val=0)
    with pytest.raises(ValueError, match="img_size"):
        make_synthetic_dataset(tmp_path / "x", img_size=16)
    with pytest.raises(TypeError, match="unknown"):
        ensure_synthetic_dataset(tmp_path / "x", n_trian=3)


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--n-train", "2", "--n-val", "1",
                           "--img-size", "96"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "synthetic.yaml")
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 2
