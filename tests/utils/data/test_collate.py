"""The training/validation collate function: stacked images equal torch.stack's, labels carry their image
index, and inside a loader worker the batch is built directly in shared memory (no extra copy)."""
from __future__ import annotations

import numpy as np
import torch
import torch.utils.data._utils.worker as worker_state

from utils.data.dataset import LoadImagesAndLabels


def _batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8, generator=gen) for _ in range(3)]
    labels = [torch.rand(n, 6, generator=gen) for n in (2, 0, 3)]
    return [(im, lb, f"im{i}.jpg", None) for i, (im, lb) in enumerate(zip(images, labels))], images


def test_collate_in_the_main_process():
    batch, images = _batch()
    imgs, targets, paths, shapes = LoadImagesAndLabels.collate_fn(batch)
    assert torch.equal(imgs, torch.stack(images, 0))
    assert targets[:, 0].tolist() == [0, 0, 2, 2, 2] and paths == ("im0.jpg", "im1.jpg", "im2.jpg")
    assert shapes == (None, None, None)


def test_collate_in_a_worker_builds_the_batch_in_shared_memory(monkeypatch):
    class Info:  # what DataLoader sets inside a worker process
        id, num_workers, seed = 0, 1, 0

    monkeypatch.setattr(worker_state, "_worker_info", Info())
    batch, images = _batch()
    imgs = LoadImagesAndLabels.collate_fn(batch)[0]
    assert imgs.is_shared() and torch.equal(imgs, torch.stack(images, 0))


def test_training_samples_collate_into_a_channels_last_batch():
    from utils.data.dataset import chw_rgb_view

    gen = np.random.default_rng(0)
    bgr = [gen.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    bgr[1] = np.fliplr(bgr[1])  # a flipped view, as numpy flips return
    views = [chw_rgb_view(im) for im in bgr]
    expected = [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)[::-1])) for im in bgr]
    assert all(torch.equal(v, e) for v, e in zip(views, expected))  # CHW RGB values, HWC memory
    batch = [(v, torch.zeros(0, 6), f"im{i}.jpg", None) for i, v in enumerate(views)]
    imgs = LoadImagesAndLabels.collate_fn(batch)[0]
    assert imgs.shape == (3, 3, 32, 48) and imgs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(imgs, torch.stack(expected, 0))
