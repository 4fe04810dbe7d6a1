"""The training/validation collate function: stacked images equal torch.stack's, labels carry their image
index, and inside a loader worker the batch is built directly in shared memory (no extra copy)."""
from __future__ import annotations

import torch
import torch.utils.data._utils.worker as worker_state

from utils.dataset import LoadImagesAndLabels


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
