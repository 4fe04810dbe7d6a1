"""The detection dataset (images + YOLO labels) and its DataLoader, as YOLOv5 v7.0 builds them.

Records come from ``utils.data.label_scan`` (verified, cached), pixels from ``utils.data.images`` (resize,
letterbox). Validation needs upstream's exact input: same image order, same rectangular batch
shapes, same letterbox and same label arithmetic, so these follow v7.0 step by step.

Training augmentation (mosaic, perspective, HSV, flips) plugs in at
``LoadImagesAndLabels._augmented_sample``; without ``augment`` a training dataset yields plain
letterboxed images, exactly like validation.
"""
from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, distributed

from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data.images import letterbox, read_image, resize_longest
from utils.data.label_scan import (DatasetError, default_cache_path, find_image_files, img2label_paths,
                              is_writable_dir, scan_labels)

LOGGER = logging.getLogger(__name__)

CACHE_MODES = ("ram", "disk")
_SEED_OFFSET = 6148914691236517205  # upstream's generator offset, kept so shuffles match

Shapes = tuple[tuple[int, int], tuple[tuple[float, float], tuple[float, float]]]


class LoadImagesAndLabels(Dataset):
    """Images and labels of one split, letterboxed to ``img_size`` (or to per-batch rectangles).

    Items are ``(image, labels, path, shapes)``: a uint8 CHW RGB tensor, an ``(n, 6)`` float
    tensor ``[0, cls, x, y, w, h]`` normalised to the returned image, the image path, and
    ``((h0, w0), ((h / h0, w / w0), (pad_w, pad_h)))`` to map boxes back to the original image.

    Attributes kept for upstream compatibility: ``im_files``, ``label_files``, ``labels`` (list of
    ``(n, 5)`` float32 normalised xywh), ``segments``, ``shapes`` (``(n, 2)`` width, height),
    ``batch`` (batch index of each image), ``batch_shapes`` (``(nb, 2)`` height, width when
    ``rect``, else None), ``n``, ``indices``, ``augment``, ``hyp``, ``mosaic``.
    """

    def __init__(self, path: str | Path | Sequence[str | Path], img_size: int = 640, batch_size: int = 16,
                 augment: bool = False, hyp: dict | None = None, rect: bool = False, stride: int = 32,
                 pad: float = 0.0, single_cls: bool = False, cache_images: str | bool | None = None,
                 prefix: str = "") -> None:
        self.img_size = img_size
        self.augment = augment
        self.hyp = hyp
        self.rect = rect
        self.mosaic = augment and not rect  # mosaic mixes images, which rectangular batches cannot
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.prefix = prefix

        self._load_records(path, prefix)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.shapes)
        self.batch = np.floor(np.arange(self.n) / batch_size).astype(int)
        self.indices = range(self.n)
        self.batch_shapes = self._sort_by_aspect_ratio(img_size, stride, pad) if rect else None

        self.ims: list[np.ndarray | None] = [None] * self.n
        self.im_hw0: list[tuple[int, int] | None] = [None] * self.n
        self.im_hw: list[tuple[int, int] | None] = [None] * self.n
        self.npy_files = [Path(f).with_suffix(".npy") for f in self.im_files]
        self.cache_mode: str | None = None
        if cache_images:
            self.cache_mode = self._cache_images(cache_images)

    def _load_records(self, path: Any, prefix: str) -> None:
        """Find images, scan (or reuse cached) labels, keep the usable pairs."""
        im_files = find_image_files(path)
        label_files = img2label_paths(im_files)
        cache_path = default_cache_path(path, label_files)
        scan = scan_labels(im_files, label_files, cache_path, prefix=prefix)
        if scan["nf"] == 0 and self.augment:
            raise DatasetError(f"{prefix}{cache_path}: no labels found, can not start training")
        if not scan["im_files"]:
            raise DatasetError(f"{prefix}{path}: all {scan['n']} images are corrupt, nothing to load")
        self.im_files: list[str] = scan["im_files"]
        self.label_files = img2label_paths(self.im_files)
        self.labels: list[np.ndarray] = scan["labels"]
        self.segments: list[list[np.ndarray]] = scan["segments"]
        self.shapes: np.ndarray = scan["shapes"]
        if self.augment and sum(len(lb) for lb in self.labels) == 0:
            raise DatasetError(f"{prefix}{cache_path}: all labels empty, can not start training")

    def _sort_by_aspect_ratio(self, img_size: int, stride: int, pad: float) -> np.ndarray:
        """Reorder images by height/width and give each batch the smallest stride-multiple shape.

        The default (quicksort) argsort is kept on purpose: ties between equal aspect ratios are
        ordered as upstream orders them, which decides the batch each image lands in.
        """
        s = self.shapes  # width, height
        ar = s[:, 1] / s[:, 0]
        irect = aspect_ratio_order(ar)
        self.im_files = [self.im_files[i] for i in irect]
        self.label_files = [self.label_files[i] for i in irect]
        self.labels = [self.labels[i] for i in irect]
        self.segments = [self.segments[i] for i in irect]
        self.shapes = s[irect]
        ar = ar[irect]

        nb = self.batch[-1] + 1
        shapes = [[1, 1]] * nb
        for i in range(nb):
            ari = ar[self.batch == i]
            mini, maxi = ari.min(), ari.max()
            if maxi < 1:  # all wider than tall: full width, reduced height
                shapes[i] = [maxi, 1]
            elif mini > 1:  # all taller than wide
                shapes[i] = [1, 1 / mini]
        return np.ceil(np.array(shapes) * img_size / stride + pad).astype(int) * stride

    def _cache_images(self, mode: str | bool) -> str:
        """Pre-load images: 'ram' keeps resized images, 'disk' writes decoded originals as .npy."""
        mode = "ram" if mode is True else str(mode).lower()
        if mode not in CACHE_MODES:
            raise ValueError(f"cache_images={mode!r}: expected one of {CACHE_MODES}")
        if mode == "disk":
            unwritable = sorted({str(f.parent) for f in self.npy_files if not is_writable_dir(f.parent)})
            if unwritable:
                LOGGER.warning("%sCannot write .npy image cache in %s (read-only); caching in RAM instead",
                               self.prefix, unwritable[0])
                mode = "ram"
        fn = self._write_npy if mode == "disk" else self._cache_in_ram
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            nbytes = sum(pool.map(fn, range(self.n)))
        LOGGER.info("%sCaching images (%.1fGB %s)", self.prefix, nbytes / 1e9, mode)
        return mode

    def _cache_in_ram(self, i: int) -> int:
        self.ims[i], self.im_hw0[i], self.im_hw[i] = self.load_image(i)
        return self.ims[i].nbytes

    def _write_npy(self, i: int) -> int:
        f = self.npy_files[i]
        if not f.exists():
            np.save(f, read_image(self.im_files[i]), allow_pickle=False)
        return f.stat().st_size

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """Image ``i`` (BGR) resized so its long side is ``img_size``, with original and new (h, w)."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        fn = self.npy_files[i]
        if self.cache_mode == "disk" and fn.exists():
            im = np.load(fn, allow_pickle=False)
        else:
            im = read_image(self.im_files[i])
        h0, w0 = im.shape[:2]
        im = resize_longest(im, self.img_size, self.augment)
        return im, (h0, w0), im.shape[:2]

    def __len__(self) -> int:
        return len(self.im_files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str, Shapes | None]:
        index = self.indices[index]  # linear, shuffled or weighted order
        if self.augment:
            img, labels, shapes = self._augmented_sample(index)
        else:
            img, labels, shapes = self._letterboxed_sample(index)
            if len(labels):
                labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)

        labels_out = torch.zeros((len(labels), 6))
        if len(labels):
            labels_out[:, 1:] = torch.from_numpy(labels)
        if self.augment:  # training: the loader's hot path
            return chw_rgb_view(img), labels_out, self.im_files[index], shapes
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    def _letterboxed_sample(self, index: int) -> tuple[np.ndarray, np.ndarray, Shapes]:
        """Image letterboxed to its final shape and its labels as pixel xyxy in that image."""
        img, (h0, w0), (h, w) = self.load_image(index)
        shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
        img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
        shapes = (h0, w0), ((h / h0, w / w0), pad)  # what COCO-style rescaling needs
        labels = self.labels[index].copy()
        if labels.size:
            labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
        return img, labels, shapes

    def _augmented_sample(self, index: int) -> tuple[np.ndarray, np.ndarray, Shapes | None]:
        """Training augmentation: image and normalised xywh labels for ``index``.

        Upstream order: mosaic (+mixup) or letterbox + random perspective, then labels to
        normalised xywh, then HSV and flips. Random numbers come from the process-wide ``random``
        and ``numpy.random`` modules, as upstream, so seeding those reproduces its stream.
        """
        from utils.data.augment import augment_hsv, mixup, random_flip, random_perspective

        hyp = self.hyp or {}
        shapes = None
        if self.mosaic and random.random() < hyp["mosaic"]:
            img, labels = self._mosaic(index)
            if random.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self._mosaic(random.randint(0, self.n - 1)))
        else:
            img, labels, shapes = self._letterboxed_sample(index)
            img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                             scale=hyp["scale"], shear=hyp["shear"],
                                             perspective=hyp["perspective"])
        if len(labels):
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)
        augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
        img, labels = random_flip(img, labels, fliplr=hyp["fliplr"], flipud=hyp["flipud"])
        return img, labels, shapes

    def _mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """A 4-image mosaic around ``index``, warped back to ``img_size`` (pixel xyxy labels)."""
        from utils.data.augment import choose_mosaic, load_mosaic

        indices, center = choose_mosaic(index, self.indices, self.img_size)
        return load_mosaic(self.load_image, indices, self.labels, self.img_size, self.hyp, center=center,
                           segments=self.segments)

    @staticmethod
    def collate_fn(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """Stack images; concatenate labels with each row's image index in column 0."""
        im, label, path, shapes = zip(*batch)
        for i, lb in enumerate(label):
            lb[:, 0] = i
        # default_collate stacks straight into shared memory inside a worker, so the batch is not
        # copied once more on its way to the main process (torch.stack alone costs that extra copy).
        # Channels-last views (training samples) are stacked as HWC: an NCHW-shaped channels_last batch.
        if all(x.dim() == 3 and not x.is_contiguous() and x.permute(1, 2, 0).is_contiguous() for x in im):
            return (default_collate([x.permute(1, 2, 0) for x in im]).permute(0, 3, 1, 2), torch.cat(label, 0),
                    path, shapes)
        return default_collate(list(im)), torch.cat(label, 0), path, shapes


def chw_rgb_view(img: np.ndarray) -> torch.Tensor:
    """A BGR HWC image as a CHW RGB tensor that is a view of one contiguous HWC RGB array (channels_last
    strides): a colour swap at memcpy speed instead of a transposing copy (0.03 vs 0.3 ms at 640x640).
    The collate function stacks such views into a channels_last batch with plain copies."""
    rgb = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def aspect_ratio_order(ar: np.ndarray) -> np.ndarray:
    """Indices that sort images by aspect ratio, with numpy's default (unstable) argsort as upstream.

    Ties (many images share 4:3) are broken by numpy's sort kernel, which differs between numpy
    versions and CPUs; that decides which images share a padded batch and moves coco128 mAP by up
    to ~0.007. Tests replace this function to reproduce a recorded order.
    """
    return ar.argsort()


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible numpy and random seeds, and single-threaded
    OpenCV: the workers are the parallelism, and each one starting a thread per core (8 workers x 16
    threads on a GPU host) makes them fight over the cores."""
    cv2.setNumThreads(0)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def create_dataloader(path: str | Path | Sequence, imgsz: int, batch_size: int, stride: int,
                      single_cls: bool = False, hyp: dict | None = None, augment: bool = False,
                      cache: str | bool | None = None, pad: float = 0.0, rect: bool = False, rank: int = -1,
                      workers: int = 8, shuffle: bool = False, prefix: str = "", seed: int = 0,
                      global_rank: int = -1) -> tuple[DataLoader, LoadImagesAndLabels]:
    """Build the dataset and a DataLoader over it, as upstream's ``create_dataloader``.

    Workers are capped by CPUs per GPU and by the batch size (0 for batch 1); a
    DistributedSampler is used when ``rank`` (the local rank) is not -1; shuffling is seeded by ``seed``
    and the process's ``global_rank`` (-1 outside DDP).

    Example:
        >>> src = "coco128/images/train2017"
        >>> loader, ds = create_dataloader(src, 640, 32, 32, rect=True, pad=0.5)  # doctest: +SKIP
    """
    if rect and shuffle:
        LOGGER.warning("%s--rect is incompatible with DataLoader shuffle, setting shuffle=False", prefix)
        shuffle = False
    dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect, stride=int(stride),
                                  pad=pad, single_cls=single_cls, cache_images=cache, prefix=prefix)
    batch_size = min(batch_size, len(dataset))
    nd = torch.cuda.device_count()
    nw = min((os.cpu_count() or 1) // max(nd, 1), batch_size if batch_size > 1 else 0, workers)
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, shuffle=shuffle)
    generator = torch.Generator()
    generator.manual_seed(_SEED_OFFSET + seed + global_rank)
    pin = torch.cuda.is_available() and os.getenv("PIN_MEMORY", "true").lower() == "true"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw,
                        sampler=sampler, pin_memory=pin, collate_fn=LoadImagesAndLabels.collate_fn,
                        worker_init_fn=seed_worker, generator=generator, persistent_workers=nw > 0)
    return loader, dataset
