"""Image discovery, image/label verification and the label cache."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import utils.data.label_scan as ls
from utils.data.label_scan import (DatasetError, default_cache_path, find_image_files, img2label_paths, scan_labels,
                              verify_image_label)

BOX = "0 0.5 0.5 0.2 0.4\n"


def _image(path: Path, w: int = 32, h: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), im)
    return path


def _pair(root: Path, name: str, label: str | None, ext: str = "jpg") -> tuple[str, str]:
    im = _image(root / "images" / "train" / f"{name}.{ext}")
    lb = root / "labels" / "train" / f"{name}.txt"
    if label is not None:
        lb.parent.mkdir(parents=True, exist_ok=True)
        lb.write_text(label)
    return str(im), str(lb)


def test_find_image_files_folder_txt_and_list(tmp_path):
    root = tmp_path / "ds"
    for rel in ("images/b.jpg", "images/sub/a.PNG", "images/c.webp"):
        _image(root / rel) if not rel.endswith("webp") else (root / rel).write_bytes(b"x")
    (root / "images" / "notes.txt").write_text("not an image")
    files = find_image_files(root / "images")
    assert files == sorted(files)
    assert [Path(f).name for f in files] == ["b.jpg", "c.webp", "a.PNG"]  # plain string sort of full paths

    lst = root / "list.txt"
    lst.write_text("./images/b.jpg\nimages/sub/a.PNG\n\n./images/notes.txt\n")
    assert find_image_files(lst) == sorted([str(root / "images" / "b.jpg"), str(root / "images" / "sub" / "a.PNG")])
    both = find_image_files([lst, root / "images" / "sub"])
    assert len(both) == 3 and both == sorted(both)


def test_find_image_files_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        find_image_files(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        find_image_files(tmp_path / "empty")


def test_img2label_paths_replaces_last_images_component():
    sep = os.sep
    src = sep.join(["", "data", "images", "set", "images", "x.1.jpg"])
    assert img2label_paths([src]) == [sep.join(["", "data", "images", "set", "labels", "x.1.txt"])]
    assert default_cache_path("/nonexistent/dir", [sep.join(["", "d", "labels", "train", "a.txt"])]) == \
        Path("/d/labels/train.cache")


def test_verify_good_missing_empty(tmp_path):
    r = verify_image_label(*_pair(tmp_path, "good", BOX + "3 0.1 0.2 0.05 0.05\n"))
    assert (r.nf, r.nm, r.ne, r.nc, r.msg) == (1, 0, 0, 0, "")
    assert r.shape == (32, 24) and r.labels.dtype == np.float32 and r.labels.shape == (2, 5)
    r = verify_image_label(*_pair(tmp_path, "missing", None))
    assert (r.nf, r.nm, r.nc) == (0, 1, 0) and r.labels.shape == (0, 5)
    r = verify_image_label(*_pair(tmp_path, "empty", "\n"))
    assert (r.nf, r.ne, r.nc) == (1, 1, 0) and r.labels.shape == (0, 5)


@pytest.mark.parametrize("label, reason", [
    ("0 0.5 0.5 0.2\n", "labels require 5 columns, row 1 has 4"),
    (BOX + "1 0.5 0.5 0.2\n", "row 2 has 4"),
    ("car 0.5 0.5 0.2 0.2\n", "could not convert"),
    ("-1 0.5 0.5 0.2 0.2\n", "negative label values"),
    ("0 1.5 0.5 0.2 0.2\n", "non-normalized or out of bounds"),
    ("0.5 0.5 0.5 0.2 0.2\n", "class ids must be integers"),
    ("0 0.1 0.1 0.2 0.1 0.3\n", "row 1 has 6"),
])
def test_bad_label_files_are_corrupt_and_named(tmp_path, label, reason):
    im, lb = _pair(tmp_path, "bad", label)
    r = verify_image_label(im, lb, prefix="val: ")
    assert r.nc == 1 and r.labels is None and r.shape is None
    assert r.msg.startswith("val: ") and im in r.msg and lb in r.msg and reason in r.msg


def test_duplicates_removed_and_polygons_become_boxes(tmp_path):
    r = verify_image_label(*_pair(tmp_path, "dup", BOX + BOX + "1 0.1 0.1 0.1 0.1\n"))
    assert r.nc == 0 and len(r.labels) == 2 and "1 duplicate labels removed" in r.msg
    r = verify_image_label(*_pair(tmp_path, "seg", "2 0.1 0.2 0.5 0.2 0.3 0.6\n"))
    assert r.nc == 0 and len(r.segments) == 1 and r.segments[0].shape == (3, 2)
    np.testing.assert_allclose(r.labels, [[2, 0.3, 0.4, 0.4, 0.4]], atol=1e-7)


def test_bad_images(tmp_path):
    root = tmp_path
    garbage = root / "images" / "train" / "garbage.jpg"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(np.random.default_rng(1).integers(0, 255, 500, dtype=np.uint8).tobytes())
    r = verify_image_label(str(garbage), str(root / "labels" / "train" / "garbage.txt"))
    assert r.nc == 1 and "garbage.jpg" in r.msg and "corrupt" in r.msg

    good = _image(root / "images" / "train" / "t.jpg", 64, 48).read_bytes()
    (root / "images" / "train" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    r = verify_image_label(str(root / "images" / "train" / "trunc.jpg"), "nolabel.txt")
    assert r.nc == 1 and "trunc.jpg" in r.msg and "truncated" in r.msg

    # bytes after the end marker: upstream restores such files; we keep them untouched, with a warning
    (root / "images" / "train" / "tail.jpg").write_bytes(good + b"\x00\x00")
    r = verify_image_label(str(root / "images" / "train" / "tail.jpg"), "nolabel.txt")
    assert r.nc == 0 and r.nm == 1 and "tail.jpg" in r.msg and "corrupt JPEG" in r.msg
    assert (root / "images" / "train" / "tail.jpg").read_bytes() == good + b"\x00\x00"

    tiny = _image(root / "images" / "train" / "tiny.png", 9, 30)
    r = verify_image_label(str(tiny), "nolabel.txt")
    assert r.nc == 1 and "<10 pixels" in r.msg


def test_exif_rotation_swaps_size(tmp_path):
    f = tmp_path / "images" / "rot.jpg"
    f.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(f, exif=exif)
    r = verify_image_label(str(f), str(tmp_path / "labels" / "rot.txt"))
    assert r.shape == (20, 40)
    assert cv2.imread(str(f)).shape[:2] == (40, 20)  # OpenCV applies the rotation too: shapes agree


def _mixed_dataset(root: Path) -> tuple[list[str], list[str]]:
    pairs = [_pair(root, "a", BOX), _pair(root, "b", BOX * 1 + "1 0.2 0.2 0.1 0.1\n", ext="png"),
             _pair(root, "c", None), _pair(root, "d", ""), _pair(root, "e", "0 0.5 0.5\n")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_scan_counts_and_cache_reuse(tmp_path, monkeypatch, caplog):
    ims, lbs = _mixed_dataset(tmp_path)
    cache = default_cache_path(tmp_path / "images" / "train", lbs)
    with caplog.at_level(logging.INFO, logger="utils.data.label_scan"):
        r = scan_labels(ims, lbs, cache, prefix="train: ")
    assert (r["nf"], r["nm"], r["ne"], r["nc"], r["n"]) == (4, 1, 1, 1, 5)
    assert r["im_files"] == ims[:4] and [len(x) for x in r["labels"]] == [1, 2, 0, 0]
    assert r["shapes"].tolist() == [[32, 24]] * 4 and not r["from_cache"]
    assert "4 found, 1 missing, 1 empty, 1 corrupt" in caplog.text and "e.jpg" in caplog.text
    assert cache == tmp_path / "labels" / "train.cache" and cache.is_file()

    def boom(*args):
        raise AssertionError("cache was not used")
    monkeypatch.setattr(ls, "verify_image_label", boom)
    again = scan_labels(ims, lbs, cache)
    assert again["from_cache"] and again["im_files"] == r["im_files"] and again["msgs"] == r["msgs"]
    for x, y in zip(again["labels"], r["labels"]):
        assert x.dtype == np.float32 and np.array_equal(x, y)
    assert np.array_equal(again["shapes"], r["shapes"])
    monkeypatch.undo()

    Path(lbs[3]).write_text(BOX)  # the empty label gains a box: the cache is stale
    fresh = scan_labels(ims, lbs, cache)
    assert not fresh["from_cache"] and (fresh["nf"], fresh["ne"]) == (4, 0)


def test_segments_survive_the_cache(tmp_path):
    ims, lbs = zip(*[_pair(tmp_path, "s", "2 0.1 0.2 0.5 0.2 0.3 0.6\n1 0.1 0.1 0.2 0.2 0.3 0.1 0.3 0.3\n"),
                     _pair(tmp_path, "t", BOX)])
    cache = tmp_path / "labels" / "train.cache"
    first = scan_labels(list(ims), list(lbs), cache)
    second = scan_labels(list(ims), list(lbs), cache)
    assert second["from_cache"]
    assert [len(s) for s in second["segments"]] == [2, 0]
    for a, b in zip(first["segments"][0], second["segments"][0]):
        assert np.array_equal(a, b)


def test_foreign_cache_is_rebuilt_without_unpickling(tmp_path):
    ims, lbs = _mixed_dataset(tmp_path)
    cache = tmp_path / "labels" / "train.cache"
    with open(cache, "wb") as f:  # what upstream writes: a pickled dict in .npy format
        np.save(f, np.array({"version": "0.7"}, dtype=object), allow_pickle=True)
    r = scan_labels(ims, lbs, cache)
    assert not r["from_cache"] and r["nf"] == 4
    assert scan_labels(ims, lbs, cache)["from_cache"]  # replaced by our own format
    cache.write_bytes(b"garbage")
    assert not scan_labels(ims, lbs, cache)["from_cache"]


def test_unwritable_cache_dir_warns_and_continues(tmp_path, caplog):
    ims, lbs = _mixed_dataset(tmp_path)
    labels_root = tmp_path / "labels"
    os.chmod(labels_root, 0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="utils.data.label_scan"):
            r = scan_labels(ims, lbs, labels_root / "train.cache")
    finally:
        os.chmod(labels_root, 0o755)
    assert r["nf"] == 4 and not (labels_root / "train.cache").exists()
    assert sum("not writeable" in m for m in caplog.messages) == 1


def test_coco128_scan_counts(shared_dir):
    images = shared_dir / "datasets" / "coco128" / "images" / "train2017"
    ims = find_image_files(images)
    lbs = img2label_paths(ims)
    cache = default_cache_path(images, lbs)
    existed = cache.exists()
    r = scan_labels(ims, lbs, cache)
    assert (r["nf"], r["nm"], r["ne"], r["nc"]) == (126, 2, 0, 0)
    assert len(r["im_files"]) == 128 and sum(len(x) for x in r["labels"]) == 929
    assert cache.exists() == existed  # never writes into the shared (read-only) folder
