"""Image loading, letterbox, and the validation dataset/dataloader (tiny data and shared coco128)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils.data.dataset import LoadImagesAndLabels, create_dataloader
from utils.data.images import letterbox, load_image

GREY = 114


def _solid(h: int, w: int, bgr=(10, 20, 30)) -> np.ndarray:
    return np.full((h, w, 3), bgr, dtype=np.uint8)


def _make_dataset(root: Path, sizes: list[tuple[int, int]], label: str = "0 0.5 0.5 0.5 0.5\n") -> Path:
    """Images of (w, h) sizes named im0..imN (PNG: lossless, so pixel values are exact) with one box each."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        cv2.imwrite(str(root / "images" / "val" / f"im{i}.png"), _solid(h, w))
        (root / "labels" / "val" / f"im{i}.txt").write_text(label)
    return root / "images" / "val"


@pytest.mark.parametrize("hw, new, kw, out_hw, pad", [
    ((480, 640), 640, dict(auto=False), (640, 640), (0.0, 80.0)),
    ((480, 640), 640, dict(auto=True), (480, 640), (0.0, 0.0)),
    ((100, 50), 64, dict(auto=True), (64, 32), (0.0, 0.0)),
    ((100, 50), 64, dict(auto=False), (64, 64), (16.0, 0.0)),
    ((31, 64), 64, dict(auto=False), (64, 64), (0.0, 16.5)),
    ((20, 30), (64, 96), dict(auto=False, scaleup=False), (64, 96), (33.0, 22.0)),
])
def test_letterbox_shapes_and_pads(hw, new, kw, out_hw, pad):
    im, ratio, (dw, dh) = letterbox(_solid(*hw), new, **kw)
    assert im.shape[:2] == out_hw
    assert (dw, dh) == pad


def test_letterbox_odd_padding_goes_bottom_right_and_scalefill():
    im, ratio, (dw, dh) = letterbox(_solid(31, 64), 64, auto=False)
    assert ratio == (1.0, 1.0) and dh == 16.5
    assert (im[15] == GREY).all() and (im[16] == (10, 20, 30)).all()  # 16 rows on top
    assert (im[46] == (10, 20, 30)).all() and (im[47] == GREY).all()  # 17 rows below
    im, ratio, pad = letterbox(_solid(20, 30), 64, auto=False, scaleFill=True)
    assert im.shape[:2] == (64, 64) and ratio == (64 / 30, 64 / 20) and pad == (0.0, 0.0)


def test_load_image_ceil_and_interpolation(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, (100, 45, 3), dtype=np.uint8)
    f = tmp_path / "a.png"
    cv2.imwrite(str(f), src)
    im, hw0, hw = load_image(f, 64)
    assert hw0 == (100, 45) and hw == (64, 29)  # 45 * 0.64 = 28.8 -> ceil 29 (v7.0)
    assert np.array_equal(im, cv2.resize(src, (29, 64), interpolation=cv2.INTER_AREA))
    im, _, _ = load_image(f, 64, augment=True)
    assert np.array_equal(im, cv2.resize(src, (29, 64), interpolation=cv2.INTER_LINEAR))
    im, _, hw = load_image(f, 200)  # enlarging always uses INTER_LINEAR
    assert hw == (200, 90) and np.array_equal(im, cv2.resize(src, (90, 200), interpolation=cv2.INTER_LINEAR))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 64)


def test_getitem_square_letterbox_labels(tmp_path):
    ds = LoadImagesAndLabels(_make_dataset(tmp_path, [(60, 40)]), img_size=64, batch_size=1)
    img, labels, path, shapes = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and img.is_contiguous()
    # load_image: 60x40 -> 64x43 (ceil); letterbox pads 21 rows: 10 above, 11 below
    assert shapes == ((40, 60), ((43 / 40, 64 / 60), (0.0, 10.5)))
    assert img[:, 9].eq(GREY).all() and img[:, 11:52, 5].tolist() == [[30] * 41, [20] * 41, [10] * 41]  # RGB
    expected = torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.5 * 43 / 64]])
    torch.testing.assert_close(labels, expected)
    assert path.endswith("im0.png")


def test_rect_batches_sort_by_aspect_ratio(tmp_path):
    sizes = [(40, 60), (60, 30), (50, 50), (60, 20), (30, 60)]  # (w, h)
    ds = LoadImagesAndLabels(_make_dataset(tmp_path, sizes), img_size=64, batch_size=2, rect=True, stride=32)
    ar = ds.shapes[:, 1] / ds.shapes[:, 0]
    assert (np.diff(ar) >= 0).all() and ds.batch.tolist() == [0, 0, 1, 1, 2]
    # batch 0: ar 1/3 and 1/2 -> [0.5, 1]; batch 1: ar 1 and 1.5 -> [1, 1]; batch 2: ar 2 -> [1, 0.5]
    assert ds.batch_shapes.tolist() == [[32, 64], [64, 64], [64, 32]]
    for i in range(len(ds)):
        img, labels, _, _ = ds[i]
        assert list(img.shape[1:]) == ds.batch_shapes[ds.batch[i]].tolist()
        assert ((labels[:, 2:] >= 0) & (labels[:, 2:] <= 1)).all()
    assert [len(lb) for lb in ds.labels] == [1] * 5 and len(ds.label_files) == 5


def test_collate_single_cls_and_caches(tmp_path, caplog):
    src = _make_dataset(tmp_path, [(60, 40), (40, 60), (50, 50)], label="3 0.5 0.5 0.5 0.5\n7 0.2 0.2 0.1 0.1\n")
    plain = LoadImagesAndLabels(src, img_size=64, batch_size=3)
    imgs, labels, paths, shapes = LoadImagesAndLabels.collate_fn([plain[i] for i in range(3)])
    assert imgs.shape == (3, 3, 64, 64) and labels[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert labels[:, 1].tolist() == [3, 7] * 3 and len(paths) == 3 and len(shapes) == 3

    single = LoadImagesAndLabels(src, img_size=64, batch_size=3, single_cls=True)
    assert all((lb[:, 0] == 0).all() for lb in single.labels)

    ram = LoadImagesAndLabels(src, img_size=64, batch_size=3, cache_images="ram")
    assert ram.cache_mode == "ram" and all(im is not None for im in ram.ims)
    disk = LoadImagesAndLabels(src, img_size=64, batch_size=3, cache_images="disk")
    assert disk.cache_mode == "disk" and all(f.is_file() for f in disk.npy_files)
    for i in range(3):
        assert torch.equal(ram[i][0], plain[i][0]) and torch.equal(disk[i][0], plain[i][0])

    for f in disk.npy_files:
        f.unlink()
    os.chmod(src, 0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="utils.data.dataset"):
            ro = LoadImagesAndLabels(src, img_size=64, batch_size=3, cache_images="disk")
    finally:
        os.chmod(src, 0o755)
    assert ro.cache_mode == "ram" and "read-only" in caplog.text and not list(src.glob("*.npy"))
    with pytest.raises(ValueError, match="cache_images"):
        LoadImagesAndLabels(src, img_size=64, cache_images="gpu")


def test_create_dataloader_options(tmp_path, caplog):
    src = _make_dataset(tmp_path, [(40 + i, 40) for i in range(6)])
    loader, ds = create_dataloader(src, 64, 1, 32, workers=4)
    assert loader.num_workers == 0 and len(loader) == 6  # batch 1 -> no worker processes
    with caplog.at_level(logging.WARNING, logger="utils.data.dataset"):
        loader, _ = create_dataloader(src, 64, 4, 32, rect=True, shuffle=True, workers=0)
    assert "incompatible" in caplog.text and isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    orders = []
    for _ in range(2):
        loader, _ = create_dataloader(src, 64, 2, 32, shuffle=True, workers=0, seed=3)
        orders.append([p for _, _, paths, _ in loader for p in paths])
    assert orders[0] == orders[1] and sorted(orders[0]) == ds.im_files


@pytest.fixture(scope="module")
def coco128_images(shared_dir) -> Path:
    return shared_dir / "datasets" / "coco128" / "images" / "train2017"


def test_coco128_rect_batch_shapes(coco128_images):
    ds = LoadImagesAndLabels(coco128_images, img_size=640, batch_size=32, rect=True, stride=32, pad=0.0)
    assert ds.batch_shapes.shape == (4, 2)
    assert (ds.batch_shapes % 32 == 0).all() and (ds.batch_shapes <= 640).all() and (ds.batch_shapes >= 32).all()
    padded = LoadImagesAndLabels(coco128_images, img_size=640, batch_size=32, rect=True, stride=32, pad=0.5)
    assert padded.batch_shapes.tolist() == [[448, 672], [512, 672], [672, 672], [672, 608]]


def test_coco128_val_loader_yields_all_images_and_labels(coco128_images):
    loader, ds = create_dataloader(coco128_images, 640, 32, 32, pad=0.5, rect=True, workers=0)
    assert len(ds) == ds.n == 128
    n_img = n_lab = 0
    for b, (imgs, labels, paths, shapes) in enumerate(loader):
        assert imgs.dtype == torch.uint8 and list(imgs.shape[2:]) == ds.batch_shapes[b].tolist()
        assert labels.shape[1] == 6 and ((labels[:, 2:] >= 0) & (labels[:, 2:] <= 1)).all()
        assert labels[:, 0].max() < len(imgs) and len(paths) == len(shapes) == len(imgs)
        n_img += len(imgs)
        n_lab += len(labels)
    assert (n_img, n_lab) == (128, 929)
