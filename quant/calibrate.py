"""Post-training calibration (PTQ): observe N images in eval mode, then freeze every observer."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from quant.schedule import iter_quantizers, set_observers

LOGGER = logging.getLogger(__name__)


def iter_images(batches: Iterable, n_images: int, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Float images in [0, 1] on `device`, at most `n_images` in all, from dataloader batches
    ((images, ...) tuples or bare tensors; uint8 images are divided by 255, float ones kept)."""
    seen = 0
    for batch in batches:
        im = batch[0] if isinstance(batch, (tuple, list)) else batch
        im = im[: n_images - seen].to(device, non_blocking=True)
        yield im.float() / 255 if im.dtype == torch.uint8 else im.float()
        seen += im.shape[0]
        if seen >= n_images:
            return


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, n_images: int, device: torch.device | str = "cpu") -> int:
    """Run up to `n_images` images (uint8 batches as the dataloader yields them) through `model` with
    observers recording, BN in eval mode, then freeze the observers. Returns the images seen. A prepared
    model runs as QAT training does (quant.frozen_view: the statistics a shared set's members give).

    Example:
        >>> seen = calibrate(prepared, val_loader, n_images=512)  # doctest: +SKIP
    """
    if n_images <= 0:
        raise ValueError(f"calibration needs at least one image, got n_images={n_images}")
    model.eval()
    forward = _observing_forward(model)
    quantizers = [q for _, q in iter_quantizers(model)]
    set_observers(model, True)
    for q in quantizers:
        q.calibrating = True
    seen = 0
    try:
        for im in iter_images(batches, n_images, device):
            forward(im)
            seen += im.shape[0]
    finally:
        for q in quantizers:
            q.calibrating = False
        set_observers(model, False)
    LOGGER.info(f"PTQ: calibrated {len(quantizers)} quantizers on {seen} images")
    return seen


def _observing_forward(model: nn.Module) -> nn.Module:
    """What observes: the frozen view of a prepared model, as training in one process runs it, else the model."""
    from quant.frozen_view import frozen_view
    from quant.prepare import PreparedModel

    return frozen_view(model) if isinstance(model, PreparedModel) else model
