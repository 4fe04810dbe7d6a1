"""Robustness of the data pipeline on broken datasets: bad images are skipped and named once,
odd-but-valid image files load, bad label rows are reported per file, caches that are stale or
not ours are rebuilt (never unpickled), and a bad dataset yaml stops with one line."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import train
from utils.data.data_config import DataConfigError, load_data_config
from utils.data.dataset import LoadImagesAndLabels
from utils.data.label_scan import DatasetError, default_cache_path, find_image_files, img2label_paths, scan_labels
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """One tiny synthetic dataset, generated once; tests work on copies."""
    yaml_file = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=6, n_val=4, img_size=96)
    return yaml_file.parent


@pytest.fixture()
def ds(tmp_path, pristine) -> Path:
    """A private copy of the synthetic dataset whose yaml points at the copy."""
    root = tmp_path / "ds"
    shutil.copytree(pristine, root)
    data = yaml.safe_load((root / "synthetic.yaml").read_text())
    data["path"] = str(root)
    (root / "synthetic.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root


def _scan(folder: Path) -> dict:
    im_files = find_image_files(folder)
    label_files = img2label_paths(im_files)
    return scan_labels(im_files, label_files, default_cache_path(folder, label_files), workers=1)


def _first(root: Path, split: str = "train") -> tuple[Path, Path]:
    im = sorted((root / "images" / split).iterdir())[0]
    return im, root / "labels" / split / (im.stem + ".txt")


def _warnings(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


# ------------------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "zero_bytes"])
def test_corrupt_image_is_skipped_and_named_once(ds, caplog, kind):
    im, _ = _first(ds)
    good = im.read_bytes()
    bad = {"random_bytes": np.random.default_rng(0).bytes(2000), "truncated": good[: len(good) // 3],
           "zero_bytes": b""}[kind]
    im.write_bytes(bad)
    caplog.set_level(logging.INFO)
    scan = _scan(ds / "images" / "train")
    assert scan["nc"] == 1 and str(im) not in scan["im_files"]
    assert len(scan["im_files"]) == 5
    named = _warnings(caplog, str(im))
    assert len(named) == 1 and "corrupt" in named[0]
    # the dataset itself goes on with the good images
    dataset = LoadImagesAndLabels(str(ds / "images" / "train"), img_size=64, stride=32)
    assert dataset.n == 5 and all(f != str(im) for f in dataset.im_files)


def test_all_images_corrupt_is_one_clear_error(ds):
    for im in (ds / "images" / "val").iterdir():
        im.write_bytes(b"")
    with pytest.raises(DatasetError, match="all 4 images are corrupt"):
        LoadImagesAndLabels(str(ds / "images" / "val"), img_size=64, stride=32)


def _write_variant(src: Path, dst_dir: Path, kind: str) -> Path:
    bgr = cv2.imread(str(src))
    if kind == "png":
        out, img = dst_dir / "a_png.png", bgr
    elif kind == "bmp":
        out, img = dst_dir / "b_bmp.bmp", bgr
    elif kind == "gray":
        out, img = dst_dir / "c_gray.png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    elif kind == "rgba":
        out, img = dst_dir / "d_rgba.png", cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    else:  # 16-bit PNG
        out, img = dst_dir / "e_16bit.png", bgr.astype(np.uint16) * 257
    assert cv2.imwrite(str(out), img), out
    return out


@pytest.mark.parametrize("kind", ["png", "bmp", "gray", "rgba", "png16"])
def test_other_image_formats_load(tmp_path, pristine, kind):
    im_dir, lb_dir = tmp_path / "d/images/train", tmp_path / "d/labels/train"
    im_dir.mkdir(parents=True)
    lb_dir.mkdir(parents=True)
    src, src_label = _first(pristine)
    out = _write_variant(src, im_dir, kind)
    shutil.copy(src_label, lb_dir / (out.stem + ".txt"))
    scan = _scan(im_dir)
    assert scan["nc"] == 0 and scan["im_files"] == [str(out)]
    h, w = cv2.imread(str(src)).shape[:2]
    assert tuple(scan["shapes"][0]) == (w, h)
    dataset = LoadImagesAndLabels(str(im_dir), img_size=64, stride=32)
    img, labels, _, _ = dataset[0]
    assert img.shape[0] == 3 and img.dtype == torch.uint8
    assert len(labels) == len(np.loadtxt(src_label, ndmin=2))


def test_exif_rotated_jpeg_keeps_labels_aligned(tmp_path):
    im_dir, lb_dir = tmp_path / "d/images/train", tmp_path / "d/labels/train"
    im_dir.mkdir(parents=True)
    lb_dir.mkdir(parents=True)
    stored = np.zeros((64, 128, 3), np.uint8)  # stored 128 wide x 64 high
    stored[:, :32] = 255  # a white band on the stored left: after orientation 6 it is on top
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(stored).save(im_dir / "rot.jpg", exif=exif.tobytes(), quality=95)
    (lb_dir / "rot.txt").write_text("0 0.5 0.125 1.0 0.25\n")  # the band, in displayed coordinates
    scan = _scan(im_dir)
    assert tuple(scan["shapes"][0]) == (64, 128)  # width, height as displayed
    dataset = LoadImagesAndLabels(str(im_dir), img_size=128, stride=32)
    img, labels, _, shapes = dataset[0]
    assert tuple(shapes[0]) == (128, 64)  # (h0, w0): the decoded image agrees with the scanned shape
    assert img.shape[1:] == (128, 128)
    # the band's label covers the bright pixels of the letterboxed image
    _, _, x, y, w, h = labels[0].tolist()
    chw = img.numpy()
    y0, y1 = int((y - h / 2) * 128) + 2, int((y + h / 2) * 128) - 2
    x0, x1 = int((x - w / 2) * 128) + 2, int((x + w / 2) * 128) - 2
    assert chw[:, y0:y1, x0:x1].mean() > 200
    assert chw[:, y1 + 4:, x0:x1].mean() < 60


# ------------------------------------------------------------------------------------- bad labels
@pytest.mark.parametrize("text, reason", [
    ("0 0.5 0.5 0.2\n", "5 columns"),
    ("0 0.5 0.5 0.2 0.2 0.1\n", "5 columns"),
    ("zero 0.5 0.5 0.2 0.2\n", "could not convert"),
    ("0 0.5 0.5 nan_ 0.2\n", "could not convert"),
    ("0 1.5 0.5 0.2 0.2\n", "out of bounds"),
    ("0 0.5 -0.1 0.2 0.2\n", "negative"),
])
def test_bad_label_rows_skip_the_file_and_name_it(ds, caplog, text, reason):
    im, lb = _first(ds)
    lb.write_text(text)
    caplog.set_level(logging.INFO)
    scan = _scan(ds / "images" / "train")
    assert scan["nc"] == 1 and str(im) not in scan["im_files"]
    named = _warnings(caplog, str(lb))
    assert len(named) == 1 and reason in named[0]


def test_duplicate_rows_are_removed_with_a_warning(ds, caplog):
    im, lb = _first(ds)
    lb.write_text("1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n")
    caplog.set_level(logging.INFO)
    scan = _scan(ds / "images" / "train")
    labels = scan["labels"][scan["im_files"].index(str(im))]
    assert labels.shape == (2, 5) and scan["nc"] == 0
    named = _warnings(caplog, str(lb))
    assert len(named) == 1 and "1 duplicate labels removed" in named[0]


def test_empty_label_files_and_orphan_labels(ds, caplog):
    im, lb = _first(ds)
    lb.write_text("")
    (ds / "labels" / "train" / "orphan_without_image.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    caplog.set_level(logging.INFO)
    scan = _scan(ds / "images" / "train")
    assert scan["ne"] == 1 and scan["nc"] == 0 and scan["n"] == 6
    assert scan["labels"][scan["im_files"].index(str(im))].shape == (0, 5)
    assert not any("orphan" in f for f in scan["im_files"])
    assert not _warnings(caplog, "orphan")


def test_folder_without_images_names_it(tmp_path):
    empty = tmp_path / "no_images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no_images: no images found"):
        LoadImagesAndLabels(str(empty), img_size=64, stride=32)


def test_class_id_out_of_range_stops_training(ds, tmp_path):
    _, lb = _first(ds)
    lb.write_text("7 0.5 0.5 0.2 0.2\n")  # the synthetic yaml has nc=6
    with pytest.raises(ValueError, match=r"label class 7 exceeds nc=6"):
        train.run(data=str(ds / "synthetic.yaml"), cfg="yolov5p.yaml", weights="", imgsz=64, epochs=1,
                  batch_size=4, workers=0, device="cpu", project=str(tmp_path / "runs"), noplots=True)


# ------------------------------------------------------------------------------------- label cache
def test_stale_cache_is_rebuilt(ds):
    folder = ds / "images" / "train"
    first = _scan(folder)
    assert not first["from_cache"] and Path(first["cache_path"]).is_file()
    assert _scan(folder)["from_cache"]
    im, _ = _first(ds)
    cv2.imwrite(str(im), np.full((80, 120, 3), 127, np.uint8))  # a different image after the cache
    os.utime(im, ns=(os.stat(im).st_atime_ns, os.stat(im).st_mtime_ns + 10**9))
    again = _scan(folder)
    assert not again["from_cache"]
    assert tuple(again["shapes"][again["im_files"].index(str(im))]) == (120, 80)


class _Marker:
    """Unpickling this would create a marker file: proof that the cache was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("kind", ["random_bytes", "upstream_pickle"])
def test_foreign_cache_is_rebuilt_not_unpickled(ds, tmp_path, kind):
    folder = ds / "images" / "train"
    im_files = find_image_files(folder)
    cache = default_cache_path(folder, img2label_paths(im_files))
    marker = tmp_path / "unpickled.marker"
    if kind == "random_bytes":
        cache.write_bytes(np.random.default_rng(1).bytes(4096))
    else:  # upstream writes np.save(dict) with pickle; ours must never load it
        with open(cache, "wb") as fh:
            np.save(fh, np.array({"version": 0.7, "hash": "x", "evil": _Marker(str(marker))}, dtype=object),
                    allow_pickle=True)
        assert pickle.dumps(_Marker(str(marker)))  # the payload really is picklable
    scan = _scan(folder)
    assert not scan["from_cache"] and len(scan["im_files"]) == 6
    assert not marker.exists()
    assert _scan(folder)["from_cache"]  # the rebuilt cache is ours and reused


# ------------------------------------------------------------------------------------- dataset yaml
def _bad_yaml(ds: Path, kind: str) -> tuple[Path, str]:
    data = yaml.safe_load((ds / "synthetic.yaml").read_text())
    if kind == "missing_names":
        del data["names"]
        needle = "'names:' field missing"
    elif kind == "missing_val":
        del data["val"]
        needle = "'val:' field missing"
    else:
        data["val"] = "images/does_not_exist"
        needle = "does_not_exist"
    out = ds / f"{kind}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out, needle


@pytest.mark.parametrize("kind", ["missing_names", "missing_val", "wrong_path"])
def test_bad_dataset_yaml_names_file_and_key(ds, kind):
    path, needle = _bad_yaml(ds, kind)
    with pytest.raises(DataConfigError) as err:
        load_data_config(path)
    text = str(err.value)
    assert str(path) in text and needle in text and "\n" not in text


@pytest.mark.parametrize("script", ["train.py", "val.py"])
def test_cli_bad_dataset_yaml_is_one_line(ds, tmp_path, script):
    path, needle = _bad_yaml(ds, "wrong_path")
    args = [sys.executable, str(REPO / script), "--data", str(path), "--imgsz", "64", "--workers", "0",
            "--device", "cpu", "--project", str(tmp_path / "runs")]
    args += ["--cfg", "yolov5p.yaml", "--weights", "", "--epochs", "1"] if script == "train.py" else \
        ["--weights", str(tmp_path / "none.pt")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0] and str(path) in errors[0]
