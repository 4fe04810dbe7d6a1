"""Tests for the training augmentation wired into LoadImagesAndLabels (mosaic/mixup, rect path)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from utils.data.dataset import LoadImagesAndLabels
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def train_images(tmp_path_factory) -> str:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "synthetic", n_train=8, n_val=1,
                                  img_size=96).parent
    return str(root / "images" / "train")


@pytest.fixture()
def hyp() -> dict:
    return yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text())


def _seed(n: int) -> None:
    random.seed(n)
    np.random.seed(n)


def _check_labels(labels: torch.Tensor, nc: int = 6) -> None:
    assert labels.shape[1] == 6
    xywh = labels[:, 2:]
    assert torch.all(xywh >= 0) and torch.all(xywh <= 1)
    # centre +/- half size stays inside the image (clip with eps=1e-3 happened before conversion)
    assert torch.all(xywh[:, :2] - xywh[:, 2:] / 2 >= -1e-5) and torch.all(xywh[:, :2] + xywh[:, 2:] / 2 <= 1 + 1e-5)
    assert torch.all((labels[:, 1] >= 0) & (labels[:, 1] < nc))


def test_mosaic_samples_are_square_with_labels_inside(train_images, hyp):
    ds = LoadImagesAndLabels(train_images, img_size=64, batch_size=4, augment=True, hyp=hyp)
    assert ds.mosaic
    _seed(0)
    total = 0
    for i in range(len(ds)):
        img, labels, _, shapes = ds[i]
        assert img.shape == (3, 64, 64) and img.dtype == torch.uint8
        assert shapes is None  # mosaic images have no original shape to map back to
        _check_labels(labels)
        total += len(labels)
    assert total > 0


def test_augmentation_follows_the_global_seed(train_images, hyp):
    hyp.update(mixup=1.0, flipud=0.5)
    ds = LoadImagesAndLabels(train_images, img_size=64, batch_size=4, augment=True, hyp=hyp)
    _seed(5)
    a = ds[3]
    _seed(5)
    b = ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check_labels(a[1])
    _seed(6)
    assert not torch.equal(ds[3][0], a[0])


def test_rect_training_uses_letterbox_and_batch_shapes(train_images, hyp):
    ds = LoadImagesAndLabels(train_images, img_size=64, batch_size=4, augment=True, hyp=hyp, rect=True, pad=0.0)
    assert not ds.mosaic
    _seed(1)
    for i in range(len(ds)):
        img, labels, _, shapes = ds[i]
        h, w = ds.batch_shapes[ds.batch[i]]
        assert img.shape == (3, h, w)
        assert shapes is not None and len(shapes) == 2
        _check_labels(labels)


def test_no_perspective_or_colour_keeps_letterbox_labels(train_images, hyp):
    """With every random transform off, the augmented path gives the plain letterboxed labels.

    Pixels differ slightly: training resizes with INTER_LINEAR, validation with INTER_AREA (upstream).
    """
    hyp.update(mosaic=0.0, degrees=0.0, translate=0.0, scale=0.0, shear=0.0, perspective=0.0,
               hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0, flipud=0.0)
    aug = LoadImagesAndLabels(train_images, img_size=64, batch_size=4, augment=True, hyp=hyp)
    plain = LoadImagesAndLabels(train_images, img_size=64, batch_size=4, augment=False)
    for i in range(3):
        a, p = aug[i], plain[i]
        assert a[0].shape == p[0].shape
        assert (a[0].float() - p[0].float()).abs().mean() < 8
        assert torch.allclose(a[1], p[1], atol=1e-6)
