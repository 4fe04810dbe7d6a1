"""A small synthetic detection dataset of coloured shapes, generated offline with numpy and cv2.

It lets training, validation and export run end to end without downloading anything; it is
meant for a tiny model on a laptop CPU, yet it is not trivial (textured backgrounds, distractor
lines, clipped and slightly overlapping objects, background-only images, non-square images).

Example:
    >>> from utils.data.synthetic import make_synthetic_dataset
    >>> yaml_path = make_synthetic_dataset("datasets/synthetic", n_train=64, n_val=16)

Command line:
    python -m utils.data.synthetic --out datasets/synthetic --n-train 256 --n-val 64
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

LOGGER = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star")
# Each class leans towards its own hue (OpenCV hue range is 0..179) so a tiny model has an easy
# first cue, but some objects take any hue so shape has to be learned as well.
_CLASS_HUES = (0, 30, 60, 90, 120, 150)
_FREE_HUE_PROB = 0.25
_GENERATOR_VERSION = 1  # bump whenever the pixels a given seed produces change
_MANIFEST = "synthetic.json"
_YAML = "synthetic.yaml"
_SPLITS = ("train", "val")
_MAX_OBJECTS = 6
_BACKGROUND_EVERY = 12  # one image in twelve holds no object at all
_SIZE_RANGE = (0.08, 0.5)  # object extent as a fraction of the shorter image side
_MAX_OVERLAP = 0.2  # largest share of either object's pixels that may overlap
_MIN_VISIBLE_PX = 20
_JPEG_QUALITY = 90
_SUBPIXEL_BITS = 4  # cv2 fixed-point drawing: coordinates carry 4 fractional bits


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image with its labels.

    `labels` is (n, 5) float64 rows `cls cx cy w h`, normalised to [0, 1]; `masks` is (n, H, W)
    bool with the visible pixels of each object (after any later object covered part of it).
    """

    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


def _image_shape(rng: np.random.Generator, img_size: int) -> tuple[int, int]:
    """Pick (height, width): mostly square, sometimes landscape or portrait, even sides."""
    if rng.random() < 0.6:
        return img_size, img_size
    short = int(round(img_size * rng.uniform(0.6, 0.9) / 2)) * 2
    return (short, img_size) if rng.random() < 0.5 else (img_size, short)


def _random_bgr(rng: np.random.Generator, hue: float, sat: tuple[int, int],
                val: tuple[int, int]) -> tuple[int, int, int]:
    """A BGR colour from a hue and saturation/value ranges (OpenCV HSV conventions)."""
    hsv = np.array([[[hue % 180, rng.integers(*sat), rng.integers(*val)]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient plus blurred blobs plus sharp thin lines, in muted colours."""
    c0 = np.array(_random_bgr(rng, rng.uniform(0, 180), (0, 90), (40, 220)), np.float32)
    c1 = np.array(_random_bgr(rng, rng.uniform(0, 180), (0, 90), (40, 220)), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * np.cos(angle) / w + yy * np.sin(angle) / h
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + t[..., None] * (c1 - c0)

    blobs = np.zeros((h, w, 3), np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 16, w // 3)), int(rng.integers(h // 16, h // 3)))
        colour = _random_bgr(rng, rng.uniform(0, 180), (0, 120), (30, 230))
        cv2.ellipse(blobs, center, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    blobs = cv2.GaussianBlur(blobs, (0, 0), sigmaX=max(h, w) / 24)
    img = (0.55 * img + 0.45 * blobs.astype(np.float32)).clip(0, 255).astype(np.uint8)

    for _ in range(int(rng.integers(2, 9))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = _random_bgr(rng, rng.uniform(0, 180), (0, 160), (20, 240))
        cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _polygon(radii: np.ndarray, angles: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Vertices from polar coordinates, in cv2 fixed-point int32 for sub-pixel drawing."""
    pts = center + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _cross_polygon(r: float, theta: float, center: np.ndarray) -> np.ndarray:
    """A plus sign with arms of half-width 0.3 r, rotated by theta."""
    a = 0.3 * r
    local = np.array([(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r),
                      (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)], np.float64)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pts = center + local @ rot.T
    return np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _shape_mask(cls: int, h: int, w: int, center: np.ndarray, r: float,
                theta: float) -> np.ndarray:
    """Boolean mask of one shape of class `cls` with circumradius r (pixels)."""
    mask = np.zeros((h, w), np.uint8)
    fixed_center = tuple(int(v) for v in np.round(center * (1 << _SUBPIXEL_BITS)))
    fixed_r = int(round(r * (1 << _SUBPIXEL_BITS)))
    name = CLASS_NAMES[cls]
    if name in ("circle", "ring"):
        cv2.circle(mask, fixed_center, fixed_r, 1, -1, cv2.LINE_8, _SUBPIXEL_BITS)
        if name == "ring":
            inner = int(round(0.55 * fixed_r))
            cv2.circle(mask, fixed_center, inner, 0, -1, cv2.LINE_8, _SUBPIXEL_BITS)
        return mask.astype(bool)
    if name == "square":
        angles = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        pts = _polygon(np.full(4, r), angles, center)
    elif name == "triangle":
        pts = _polygon(np.full(3, r), theta + np.arange(3) * 2 * np.pi / 3, center)
    elif name == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = _polygon(radii, theta + np.arange(10) * np.pi / 5, center)
    else:
        pts = _cross_polygon(r, theta, center)
    cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, _SUBPIXEL_BITS)
    return mask.astype(bool)


def _place_objects(rng: np.random.Generator, h: int, w: int,
                   n_objects: int) -> tuple[np.ndarray, list[int]]:
    """Choose shapes and positions with limited overlap; return an owner map and classes.

    The owner map holds, per pixel, the index of the object drawn last there (-1 for none), so
    each object's visible pixels, and hence its tight box, follow from it.
    """
    owner = np.full((h, w), -1, np.int16)
    classes: list[int] = []
    short = min(h, w)
    for _ in range(n_objects * 10):  # bounded retries keep generation time predictable
        if len(classes) == n_objects:
            break
        cls = int(rng.integers(len(CLASS_NAMES)))
        r = 0.5 * short * rng.uniform(*_SIZE_RANGE)
        # Centres may sit a little outside the frame's inner area so some objects are clipped.
        center = np.array([rng.uniform(0.3 * r, w - 0.3 * r), rng.uniform(0.3 * r, h - 0.3 * r)])
        mask = _shape_mask(cls, h, w, center, r, rng.uniform(0, 2 * np.pi))
        area = int(mask.sum())
        if area < _MIN_VISIBLE_PX:
            continue
        covered = owner[mask]
        if not _overlap_ok(owner, covered, area):
            continue
        owner[mask] = len(classes)
        classes.append(cls)
    return owner, classes


def _overlap_ok(owner: np.ndarray, covered: np.ndarray, area: int) -> bool:
    """True when the new mask overlaps little of itself and of every object it would cover."""
    hit = covered[covered >= 0]
    if hit.size > _MAX_OVERLAP * area:
        return False
    for idx, count in zip(*np.unique(hit, return_counts=True)):
        if count > _MAX_OVERLAP * int((owner == idx).sum()):
            return False
    return True


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, cls: int) -> None:
    """Fill the mask with a shaded colour typical of the class (sometimes any hue)."""
    hue = rng.uniform(0, 180) if rng.random() < _FREE_HUE_PROB else \
        _CLASS_HUES[cls] + rng.uniform(-8, 8)
    colour = np.array(_random_bgr(rng, hue, (140, 256), (140, 256)), np.float32)
    ys, xs = np.nonzero(mask)
    # A gentle linear shade keeps shapes from being perfectly flat colour patches.
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    span = max(img.shape[:2])
    shade = 1.0 + (gx * (xs - xs.mean()) + gy * (ys - ys.mean())) / span
    img[ys, xs] = (colour[None, :] * shade[:, None]).clip(0, 255).astype(np.uint8)


def _labels_from_owner(owner: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Tight normalised boxes and visible masks of each object from the owner map."""
    h, w = owner.shape
    rows, masks = [], []
    for idx, cls in enumerate(classes):
        mask = owner == idx
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            continue
        x0, x1 = xs.min(), xs.max() + 1  # pixel edges: pixel i spans [i, i + 1)
        y0, y1 = ys.min(), ys.max() + 1
        rows.append([cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
        masks.append(mask)
    labels = np.array(rows, np.float64).reshape(-1, 5)
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return labels, stacked


def render_sample(seed: int, split: str, index: int, img_size: int = 256) -> SyntheticSample:
    """Render image `index` of `split` for `seed`; the same arguments give the same pixels.

    Each image has its own random stream, so changing the number of images never changes the
    images that remain.
    """
    rng = np.random.default_rng([seed, _SPLITS.index(split), index])
    h, w = _image_shape(rng, img_size)
    img = _background(rng, h, w)
    n_objects = 0 if index % _BACKGROUND_EVERY == _BACKGROUND_EVERY - 1 else \
        int(rng.integers(1, _MAX_OBJECTS + 1))
    owner, classes = _place_objects(rng, h, w, n_objects)
    for idx, cls in enumerate(classes):
        _paint(rng, img, owner == idx, cls)
    noise = rng.normal(0.0, rng.uniform(3.0, 10.0), size=img.shape)
    img = (img.astype(np.float32) + noise).clip(0, 255).astype(np.uint8)
    labels, masks = _labels_from_owner(owner, classes)
    return SyntheticSample(image=img, labels=labels, masks=masks)


def _params(n_train: int, n_val: int, img_size: int, seed: int) -> dict[str, int]:
    """The manifest record; any change in it (or in the generator) means regeneration."""
    return {"version": _GENERATOR_VERSION, "n_train": n_train, "n_val": n_val,
            "img_size": img_size, "seed": seed}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest written by a previous run, or None when absent or unreadable."""
    path = root / _MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        LOGGER.warning("%s: unreadable synthetic manifest (%s); regenerating", path, err)
        return None
    return data if isinstance(data, dict) else None


def _is_complete(root: Path, manifest: dict[str, Any] | None) -> bool:
    """True when the manifest says generation finished and every image and label is there."""
    if not manifest or not manifest.get("complete") or not (root / _YAML).is_file():
        return False
    for split in _SPLITS:
        n = manifest.get(f"n_{split}")
        images = list((root / "images" / split).glob("*.jpg"))
        labels = list((root / "labels" / split).glob("*.txt"))
        if len(images) != n or len(labels) != n:
            return False
    return True


def _clear(root: Path, manifest: dict[str, Any] | None, overwrite: bool) -> None:
    """Remove a previous dataset; refuse to delete a folder we did not generate."""
    ours = manifest is not None or overwrite
    for split in _SPLITS:
        for kind in ("images", "labels"):
            folder = root / kind / split
            if folder.exists() and any(folder.iterdir()) and not ours:
                raise FileExistsError(f"{folder}: not empty and holds no synthetic manifest; "
                                      "pass overwrite=True to replace it")
    for split in _SPLITS:
        for kind in ("images", "labels"):
            shutil.rmtree(root / kind / split, ignore_errors=True)
        # Label caches written by a dataset loader would describe the old files.
        (root / "labels" / f"{split}.cache").unlink(missing_ok=True)


def _write_split(root: Path, split: str, n: int, img_size: int, seed: int) -> int:
    """Render and write one split; return the number of boxes written."""
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    n_boxes = 0
    for i in range(n):
        sample = render_sample(seed, split, i, img_size)
        stem = f"{split}_{i:06d}"
        if not cv2.imwrite(str(img_dir / f"{stem}.jpg"), sample.image,
                           [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]):
            raise OSError(f"{img_dir / stem}.jpg: cv2.imwrite failed")
        lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in sample.labels]
        (lbl_dir / f"{stem}.txt").write_text("".join(lines))
        n_boxes += len(lines)
    return n_boxes


def _validate(n_train: int, n_val: int, img_size: int) -> None:
    if n_train < 1 or n_val < 1:
        raise ValueError(f"synthetic dataset needs n_train >= 1 and n_val >= 1, "
                         f"got n_train={n_train}, n_val={n_val}")
    if not 64 <= img_size <= 2048:
        raise ValueError(f"synthetic img_size must be in [64, 2048], got {img_size}")


def make_synthetic_dataset(root: str | Path, n_train: int = 256, n_val: int = 64,
                           img_size: int = 256, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the shapes dataset under `root` and return the path of its dataset yaml.

    Layout: `root/images/{train,val}/*.jpg`, `root/labels/{train,val}/*.txt` (YOLO rows
    `cls cx cy w h`, normalised; background images get an empty file), `root/synthetic.yaml`
    and `root/synthetic.json` (the parameters). If a complete dataset with the same parameters
    is already there nothing is written; `overwrite=True` always regenerates. The same
    parameters give byte-identical files.
    """
    _validate(n_train, n_val, img_size)
    root = Path(root)
    params = _params(n_train, n_val, img_size, seed)
    manifest = _read_manifest(root)
    if not overwrite and _is_complete(root, manifest) and \
            {k: manifest.get(k) for k in params} == params:
        LOGGER.debug("%s: synthetic dataset up to date", root)
        return root / _YAML
    _clear(root, manifest, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    # Written first with complete=False, so an interrupted run is recognised and redone.
    (root / _MANIFEST).write_text(json.dumps({**params, "complete": False}, indent=1))
    n_boxes = sum(_write_split(root, split, params[f"n_{split}"], img_size, seed)
                  for split in _SPLITS)
    data = {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(CLASS_NAMES))}
    (root / _YAML).write_text(yaml.safe_dump(data, sort_keys=False))
    (root / _MANIFEST).write_text(json.dumps({**params, "complete": True}, indent=1))
    LOGGER.info("%s: wrote %d train + %d val synthetic images with %d boxes",
                root, n_train, n_val, n_boxes)
    return root / _YAML


def ensure_synthetic_dataset(root: str | Path = "datasets/synthetic", **kwargs: int) -> Path:
    """Return the dataset yaml under `root`, generating the dataset on first use.

    Parameters given in `kwargs` (n_train, n_val, img_size, seed) must match an existing
    dataset or it is regenerated; parameters left out accept whatever was generated before
    (and are kept when regenerating, e.g. after a generator change), else take the defaults.
    """
    keys = ("n_train", "n_val", "img_size", "seed")
    unknown = set(kwargs) - set(keys)
    if unknown:
        raise TypeError(f"ensure_synthetic_dataset: unknown arguments {sorted(unknown)}")
    root = Path(root)
    manifest = _read_manifest(root)
    if _is_complete(root, manifest) and manifest.get("version") == _GENERATOR_VERSION and \
            all(manifest.get(k) == v for k, v in kwargs.items()):
        return root / _YAML
    previous = {k: manifest[k] for k in keys if isinstance((manifest or {}).get(k), int)}
    return make_synthetic_dataset(root, **{**previous, **kwargs})


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset.")
    parser.add_argument("--out", default="datasets/synthetic", help="dataset folder")
    parser.add_argument("--n-train", type=int, default=256, help="number of training images")
    parser.add_argument("--n-val", type=int, default=64, help="number of validation images")
    parser.add_argument("--img-size", type=int, default=256, help="longest image side, pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the dataset yaml path."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = make_synthetic_dataset(args.out, args.n_train, args.n_val, args.img_size,
                                      args.seed, args.overwrite)
    except (ValueError, OSError) as err:
        LOGGER.error("synthetic: %s", err)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
