"""AutoAnchor: check that a model's anchors fit a dataset's boxes, and evolve better ones when not.

Behaviour and numbers follow YOLOv5 v7.0. A box fits an anchor when neither its width nor its height
ratio to the anchor exceeds ``thr`` (4.0 by default, the ``anchor_t`` hyperparameter); the best
possible recall (BPR) is the share of boxes that fit at least one anchor.

``dataset`` objects need only ``shapes`` (``(n, 2)`` image ``width, height``) and ``labels`` (a list
of ``(k, 5)`` arrays ``class, x, y, w, h`` normalised to the image).

Randomness: with ``seed=None`` the global ``random``/``numpy`` generators are used, so runs seeded
with :func:`utils.torch_utils.init_seeds` draw exactly what upstream draws; an integer ``seed`` uses
private generators instead and leaves the global state alone.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from utils.log import TQDM_BAR_FORMAT, colorstr
from utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)
PREFIX = colorstr("AutoAnchor: ")


def _rngs(seed: int | None) -> tuple[Any, Any]:
    """(numpy RandomState-like, python Random-like) generators: the global ones when seed is None."""
    if seed is None:
        return np.random, random
    return np.random.RandomState(seed), random.Random(seed)


def _ratio_metric(k: torch.Tensor, wh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box and anchor, the worse of the w and h ratios folded into (0, 1]; and each box's best."""
    r = wh[:, None] / k[None]
    x = torch.min(r, 1 / r).min(2)[0]
    return x, x.max(1)[0]


def check_anchor_order(m: torch.nn.Module) -> None:
    """Flip a Detect layer's anchors if their size order (small->large) disagrees with its strides."""
    area = m.anchors.prod(-1).mean(-1).view(-1)  # mean anchor area per output layer
    da = area[-1] - area[0]
    ds = m.stride[-1] - m.stride[0]
    if da and (da.sign() != ds.sign()):
        LOGGER.info(f"{PREFIX}Reversing anchor order")
        m.anchors[:] = m.anchors.flip(0)


def _label_wh(dataset: Any, img_size: int, scale: np.ndarray | None = None) -> np.ndarray:
    """Pixel (w, h) of every label once each image's long side is resized to ``img_size``."""
    shapes = img_size * np.asarray(dataset.shapes) / np.asarray(dataset.shapes).max(1, keepdims=True)
    if scale is not None:
        shapes = shapes * scale
    parts = [np.asarray(lb)[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)]
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def check_anchors(dataset: Any, model: torch.nn.Module, thr: float = 4.0, imgsz: int = 640,
                  gen: int = 1000, seed: int | None = None) -> bool:
    """Check the model's anchors against the dataset and replace them when k-means does better.

    The Detect layer is ``model.model[-1]`` (DDP wrappers are unwrapped); its ``anchors`` are in grid
    units (pixels / stride) and stay so. Labels are jittered by a random scale in [0.9, 1.1) per
    image, as upstream. Returns True when the anchors were replaced.
    """
    m = de_parallel(model).model[-1]
    npr, _ = _rngs(seed)
    scale = npr.uniform(0.9, 1.1, size=(len(dataset.shapes), 1))
    wh = torch.tensor(_label_wh(dataset, imgsz, scale)).float()

    def metric(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, best = _ratio_metric(k, wh)
        aat = (x > 1 / thr).float().sum(1).mean()  # anchors above threshold per box
        bpr = (best > 1 / thr).float().mean()
        return bpr, aat

    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors = m.anchors.clone() * stride  # pixels
    bpr, aat = metric(anchors.cpu().view(-1, 2))
    report = f"{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(f"{report}Current anchors are a good fit to dataset")
        return False
    LOGGER.info(f"{report}Anchors are a poor fit to dataset, attempting to improve...")
    na = m.anchors.numel() // 2
    new = kmean_anchors(dataset, n=na, img_size=imgsz, thr=thr, gen=gen, verbose=False,
                        seed=None if seed is None else seed + 1)
    new_bpr = metric(torch.tensor(new))[0]
    if new_bpr <= bpr:
        LOGGER.info(f"{PREFIX}Done (original anchors better than new anchors, proceed with original anchors)")
        return False
    with torch.no_grad():
        m.anchors[:] = torch.tensor(new, device=m.anchors.device).type_as(m.anchors).view_as(m.anchors)
        check_anchor_order(m)  # compare in pixels, before converting to grid units
        m.anchors /= stride
    LOGGER.info(f"{PREFIX}Done (optional: update model *.yaml to use these anchors in the future)")
    return True


def _dataset_from_yaml(data: str | Path) -> Any:
    """Shapes and labels of a dataset yaml's train split (what upstream reads for this purpose)."""
    from types import SimpleNamespace

    from utils.data.data_config import load_data_config
    from utils.data.label_scan import find_image_files, img2label_paths, verify_image_label

    cfg = load_data_config(data)
    images = find_image_files(cfg["train"])
    records = [verify_image_label(im, lb) for im, lb in zip(images, img2label_paths(images))]
    records = [r for r in records if r.labels is not None]
    return SimpleNamespace(shapes=np.array([r.shape for r in records], dtype=np.float64),
                           labels=[r.labels for r in records])


def _initial_anchors(wh: np.ndarray, n: int, img_size: int, npr: Any) -> np.ndarray:
    """k-means centres on whitened (w, h); random anchors when k-means cannot give ``n`` of them."""
    from scipy.cluster.vq import kmeans

    LOGGER.info(f"{PREFIX}Running kmeans for {n} anchors on {len(wh)} points...")
    if n <= len(wh):
        sigma = wh.std(0)  # whitening: k-means distances in units of each axis' spread
        kwargs = {} if npr is np.random else {"seed": npr}
        try:
            with np.errstate(divide="ignore", invalid="ignore"):
                k = kmeans(wh / sigma, n, iter=30, **kwargs)[0] * sigma
        except ValueError:  # zero spread on an axis makes non-finite whitened points
            k = np.zeros((0, 2))
        if len(k) == n:  # k-means returns fewer centres when points are too few or too alike
            return k
    LOGGER.warning(f"{PREFIX}WARNING switching strategies from kmeans to random init")
    return np.sort(npr.rand(n * 2)).reshape(n, 2) * img_size


def _describe(k: np.ndarray, wh0: torch.Tensor, thr: float, n: int, img_size: int) -> str:
    x, best = _ratio_metric(torch.tensor(k, dtype=torch.float32), wh0)
    bpr, aat = (best > thr).float().mean(), (x > thr).float().mean() * n
    anchors = ", ".join(f"{round(a[0])},{round(a[1])}" for a in k)
    return (f"{PREFIX}thr={thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
            f"{PREFIX}n={n}, img_size={img_size}, metric_all={x.mean():.3f}/{best.mean():.3f}-mean/best, "
            f"past_thr={x[x > thr].mean():.3f}-mean: {anchors}")


def kmean_anchors(dataset: Any = "./data/coco128.yaml", n: int = 9, img_size: int = 640, thr: float = 4.0,
                  gen: int = 1000, verbose: bool = True, seed: int | None = None) -> np.ndarray:
    """Anchors evolved for a dataset: k-means on label sizes, then a genetic search on fitness.

    ``dataset`` is a dataset-like object (see the module docstring) or a dataset yaml path (its train
    split is scanned). Returns ``(n, 2)`` float32 pixel anchors sorted by area, small to large.

    Example::

        anchors = kmean_anchors(train_dataset, n=9, img_size=640, gen=1000)
    """
    if isinstance(dataset, (str, Path)):
        dataset = _dataset_from_yaml(dataset)
    npr, pyr = _rngs(seed)
    thr = 1 / thr
    wh0 = _label_wh(dataset, img_size)
    tiny = (wh0 < 3.0).any(1).sum()
    if tiny:
        LOGGER.warning(f"{PREFIX}WARNING Extremely small objects found: {tiny} of {len(wh0)} labels "
                       f"are <3 pixels in size")
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # boxes under 2 px on both sides cannot be learnt
    k = _initial_anchors(wh, n, img_size, npr)
    wh, wh0 = torch.tensor(wh, dtype=torch.float32), torch.tensor(wh0, dtype=torch.float32)
    k = k[np.argsort(k.prod(1))]

    def fitness(anchors: np.ndarray) -> torch.Tensor:
        _, best = _ratio_metric(torch.tensor(anchors, dtype=torch.float32), wh)
        return (best * (best > thr).float()).mean()

    f, sh, mp, s = fitness(k), k.shape, 0.9, 0.1  # fitness, shape, mutation probability, sigma
    pbar = tqdm(range(gen), bar_format=TQDM_BAR_FORMAT, disable=not LOGGER.isEnabledFor(logging.INFO))
    for _ in pbar:
        v = np.ones(sh)
        while (v == 1).all():  # redraw until something mutates, so no generation is wasted
            v = ((npr.random(sh) < mp) * pyr.random() * npr.randn(*sh) * s + 1).clip(0.3, 3.0)
        kg = (k.copy() * v).clip(min=2.0)
        fg = fitness(kg)
        if fg > f:
            f, k = fg, kg.copy()
            pbar.desc = f"{PREFIX}Evolving anchors with Genetic Algorithm: fitness = {f:.4f}"
            if verbose:
                LOGGER.info(_describe(k[np.argsort(k.prod(1))], wh0, thr, n, img_size))
    k = k[np.argsort(k.prod(1))]
    LOGGER.info(_describe(k, wh0, thr, n, img_size))
    return k.astype(np.float32)
