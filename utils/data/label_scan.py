"""Find images, pair them with YOLO label files, verify both, and cache the result.

Label files follow the YOLO format: one object per row, ``class x_center y_center width height``
normalised to [0, 1]; a row with more than 6 values is a polygon ``class x1 y1 x2 y2 ...`` that is
turned into its bounding box. The checks and counts (found, missing, empty, corrupt) are those of
YOLOv5 v7.0, so the same images and boxes reach validation. Two deliberate differences: a JPEG
without its end marker is never rewritten (the dataset may be read-only), it is kept with a
warning when it still decodes; and the label cache is a plain ``.npz`` archive loaded without
pickle, so a cache file cannot run code.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

LOGGER = logging.getLogger(__name__)

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
CACHE_VERSION = "yq-labels-1"
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset that cannot be used as given (no images, unreadable source, ...)."""


class _BadSample(Exception):
    """Private: one image/label pair fails a check; the message says why."""


def find_image_files(source: str | Path | Sequence[str | Path]) -> list[str]:
    """List the images of a folder (recursive), a ``.txt`` list of images, or a list of those.

    Entries of a ``.txt`` list that start with ``./`` are taken relative to the list's folder
    (as upstream); other relative entries too, when they do not exist relative to the current
    directory. Only files with an extension in ``IMG_FORMATS`` are kept; the result is a plain
    string sort, as upstream, so image order (and rectangular batches) match.
    """
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    files: list[str] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files += glob.glob(str(p / "**" / "*.*"), recursive=True)
        elif p.is_file():
            parent = p.parent
            for line in p.read_text(encoding="utf-8", errors="ignore").strip().splitlines():
                entry = line.strip()
                if not entry:
                    continue
                if entry.startswith("./"):
                    entry = str(parent / entry[2:])
                elif not os.path.isabs(entry) and not os.path.exists(entry):
                    entry = str(parent / entry)
                files.append(entry)
        else:
            raise FileNotFoundError(f"{p}: image source does not exist")
    images = sorted(f.replace("/", os.sep) for f in files if f.rsplit(".", 1)[-1].lower() in IMG_FORMATS)
    if not images:
        raise DatasetError(f"{', '.join(str(s) for s in sources)}: no images found (formats: {', '.join(IMG_FORMATS)})")
    return images


def img2label_paths(img_paths: Iterable[str]) -> list[str]:
    """Map ``.../images/.../x.jpg`` to ``.../labels/.../x.txt`` (last ``images`` folder only)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return [sb.join(str(x).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt" for x in img_paths]


def default_cache_path(source: str | Path | Sequence, label_files: Sequence[str]) -> Path:
    """Where upstream keeps the label cache: beside a ``.txt`` source, else beside the labels folder."""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        return Path(source).with_suffix(".cache")
    return Path(label_files[0]).parent.with_suffix(".cache")


@dataclass
class LabelRecord:
    """The outcome of checking one image and its label file.

    ``labels`` is ``(n, 5)`` float32 ``[class, x, y, w, h]`` (normalised) and ``shape`` is
    ``(width, height)`` after EXIF rotation; both are ``None`` when the pair is corrupt (``nc``).
    ``nm``/``nf``/``ne``/``nc`` are 0 or 1: label missing, found, empty, pair corrupt.
    """

    im_file: str
    labels: np.ndarray | None
    shape: tuple[int, int] | None
    segments: list[np.ndarray] = field(default_factory=list)
    nm: int = 0
    nf: int = 0
    ne: int = 0
    nc: int = 0
    msg: str = ""


def exif_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped for EXIF orientations 6 and 8 (as upstream).

    Only JPEG/MPO EXIF is read (parsed at open, no pixel decode), which is what upstream's
    ``_getexif`` saw; an unreadable EXIF block means no rotation.
    """
    w, h = img.size
    if (img.format or "").upper() not in ("JPEG", "MPO"):
        return w, h
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return w, h
    return (h, w) if orientation in (6, 8) else (w, h)


def _check_image(im_file: str) -> tuple[tuple[int, int], str]:
    """Verify an image; return its size and a warning (empty if none). Raises _BadSample."""
    try:
        with Image.open(im_file) as im:
            shape = exif_size(im)
            im.verify()
            fmt = (im.format or "").lower()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise _BadSample(f"cannot read image: {e}") from e
    if shape[0] < 10 or shape[1] < 10:
        raise _BadSample(f"image size {shape} <10 pixels")
    if fmt not in IMG_FORMATS:
        raise _BadSample(f"invalid image format {fmt or 'unknown'}")
    if fmt in ("jpg", "jpeg"):
        with open(im_file, "rb") as f:
            f.seek(-2, 2)
            if f.read() != b"\xff\xd9":
                return shape, _check_jpeg_decodes(im_file)
    return shape, ""


def _check_jpeg_decodes(im_file: str) -> str:
    """A JPEG without end marker: keep it only if both PIL and OpenCV can decode it fully."""
    try:
        with Image.open(im_file) as im:
            im.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise _BadSample(f"corrupt JPEG that cannot be decoded: {e}") from e
    if cv2.imread(im_file) is None:
        raise _BadSample("corrupt JPEG that OpenCV cannot decode")
    return "corrupt JPEG (no end marker), kept because it decodes; re-save it to silence this warning"


def _segments_to_boxes(segments: list[np.ndarray]) -> np.ndarray:
    """Polygons (k, 2) -> boxes (n, 4) xywh, float32 throughout as upstream."""
    boxes = np.array([[s[:, 0].min(), s[:, 1].min(), s[:, 0].max(), s[:, 1].max()] for s in segments])
    out = np.copy(boxes)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) / 2
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2
    out[:, 2] = boxes[:, 2] - boxes[:, 0]
    out[:, 3] = boxes[:, 3] - boxes[:, 1]
    return out


def _parse_label_text(text: str, lb_file: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Rows of a label file -> ((n, 5) float32, polygons). Raises _BadSample naming the file."""
    rows = [x.split() for x in text.strip().splitlines() if len(x)]
    segments: list[np.ndarray] = []
    try:
        if any(len(r) > 6 for r in rows):
            classes = np.array([r[0] for r in rows], dtype=np.float32)
            segments = [np.array(r[1:], dtype=np.float32).reshape(-1, 2) for r in rows]
            return np.concatenate((classes.reshape(-1, 1), _segments_to_boxes(segments)), 1), segments
        for k, r in enumerate(rows, 1):
            if len(r) != 5:
                raise _BadSample(f"{lb_file}: labels require 5 columns, row {k} has {len(r)}")
        return np.array(rows, dtype=np.float32).reshape(-1, 5), segments
    except ValueError as e:
        raise _BadSample(f"{lb_file}: {e}") from e


def _check_labels(lb: np.ndarray, segments: list[np.ndarray], lb_file: str) -> tuple[np.ndarray, list, str]:
    """Value checks and duplicate removal (upstream keeps np.unique's sorted row order)."""
    bad_rows = np.flatnonzero(~np.isfinite(lb).all(1))  # NaN compares False with everything: test it first
    if len(bad_rows):
        raise _BadSample(f"{lb_file}: non-finite label values (nan/inf) in row {bad_rows[0] + 1}")
    if (lb < 0).any():
        raise _BadSample(f"{lb_file}: negative label values {lb[lb < 0]}")
    if (lb[:, 1:] > 1).any():
        raise _BadSample(f"{lb_file}: non-normalized or out of bounds coordinates {lb[:, 1:][lb[:, 1:] > 1]}")
    if (lb[:, 0] != np.round(lb[:, 0])).any():
        raise _BadSample(f"{lb_file}: class ids must be integers, got {lb[:, 0][lb[:, 0] != np.round(lb[:, 0])]}")
    _, keep = np.unique(lb, axis=0, return_index=True)
    if len(keep) < len(lb):
        msg = f"{len(lb) - len(keep)} duplicate labels removed from {lb_file}"
        return lb[keep], ([segments[x] for x in keep] if segments else segments), msg
    return lb, segments, ""


def verify_image_label(im_file: str, lb_file: str, prefix: str = "") -> LabelRecord:
    """Check one image and its label file; never raises for bad data, reports it in the record."""
    empty = np.zeros((0, 5), dtype=np.float32)
    nf = nm = ne = 0
    try:
        shape, warning = _check_image(im_file)
        segments: list[np.ndarray] = []
        if os.path.isfile(lb_file):
            nf = 1
            with open(lb_file, encoding="utf-8", errors="replace") as f:
                lb, segments = _parse_label_text(f.read(), lb_file)
            if len(lb):
                lb, segments, dup_msg = _check_labels(lb, segments, lb_file)
                warning = warning or dup_msg
            else:
                ne, lb = 1, empty
        else:
            nm, lb = 1, empty
    except (_BadSample, OSError) as e:
        msg = f"{prefix}{im_file}: ignoring corrupt image/label: {e}"
        return LabelRecord(im_file, None, None, [], nm, nf, ne, 1, msg)
    msg = f"{prefix}{im_file}: {warning}" if warning else ""
    return LabelRecord(im_file, lb, shape, segments, nm, nf, ne, 0, msg)


def files_hash(paths: Iterable[str]) -> str:
    """A digest of paths, sizes and modification times: changes when any file changes."""
    h = hashlib.md5()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def is_writable_dir(folder: str | Path) -> bool:
    """True if we may write in ``folder``.

    Besides ``os.access`` we honour the folder's permission bits: root passes ``os.access`` on
    a ``r-x`` folder, but such a folder was made read-only on purpose (shared datasets), so we
    never write there.
    """
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IWUSR) and os.access(folder, os.W_OK)


def _pack_cache(result: dict) -> dict[str, np.ndarray]:
    """Flatten a scan result into plain arrays (no Python objects, so no pickle is needed)."""
    segs = [s for per_image in result["segments"] for s in per_image]
    return {
        "version": np.array(CACHE_VERSION),
        "hash": np.array(result["hash"]),
        "im_files": np.array(result["im_files"], dtype=str),
        "label_counts": np.array([len(x) for x in result["labels"]], dtype=np.int64),
        "labels": np.concatenate(result["labels"], 0) if result["labels"] else np.zeros((0, 5), np.float32),
        "shapes": np.asarray(result["shapes"], dtype=np.int64).reshape(-1, 2),
        "seg_counts": np.array([len(x) for x in result["segments"]], dtype=np.int64),
        "seg_lengths": np.array([len(s) for s in segs], dtype=np.int64),
        "seg_points": np.concatenate(segs, 0) if segs else np.zeros((0, 2), np.float32),
        "results": np.array([result[k] for k in ("nf", "nm", "ne", "nc", "n")], dtype=np.int64),
        "msgs": np.array(result["msgs"], dtype=str),
    }


def _unpack_cache(z: dict[str, np.ndarray]) -> dict:
    """Inverse of _pack_cache."""
    n = len(z["im_files"])
    labels = np.split(z["labels"].astype(np.float32), np.cumsum(z["label_counts"])[:-1]) if n else []
    points = z["seg_points"].astype(np.float32)
    flat = np.split(points, np.cumsum(z["seg_lengths"])[:-1]) if len(z["seg_lengths"]) else []
    bounds = np.concatenate(([0], np.cumsum(z["seg_counts"])))
    segments = [list(flat[bounds[i]:bounds[i + 1]]) for i in range(n)]
    nf, nm, ne, nc, total = (int(v) for v in z["results"])
    return {
        "im_files": [str(x) for x in z["im_files"]], "labels": list(labels), "segments": segments,
        "shapes": z["shapes"].reshape(-1, 2), "nf": nf, "nm": nm, "ne": ne, "nc": nc, "n": total,
        "msgs": [str(x) for x in z["msgs"]], "hash": str(z["hash"]),
    }


def load_label_cache(cache_path: Path, expected_hash: str) -> dict | None:
    """Read a cache written by us for exactly these files, or None (missing, stale, foreign, broken)."""
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as npz:
            z = {k: npz[k] for k in npz.files}
        if str(z["version"]) != CACHE_VERSION or str(z["hash"]) != expected_hash:
            LOGGER.debug("%s: label cache is stale or from another version, rebuilding", cache_path)
            return None
        return _unpack_cache(z)
    # a foreign (e.g. upstream pickled) or damaged cache is simply rebuilt
    except (OSError, ValueError, KeyError, EOFError) as e:
        LOGGER.debug("%s: label cache unreadable (%s), rebuilding", cache_path, e)
        return None


def save_label_cache(cache_path: Path, result: dict, prefix: str = "") -> bool:
    """Write the cache atomically; warn once and return False when the folder is not writable."""
    tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
    try:
        if not is_writable_dir(cache_path.parent):
            raise PermissionError(f"no write permission for {cache_path.parent}")
        with open(tmp, "wb") as f:
            np.savez(f, **_pack_cache(result))
        os.replace(tmp, cache_path)
    except OSError as e:
        LOGGER.warning("%sCache directory %s is not writeable, continuing without label cache: %s",
                       prefix, cache_path.parent, e)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    LOGGER.info("%sNew cache created: %s", prefix, cache_path)
    return True


def _verify_all(im_files: Sequence[str], label_files: Sequence[str], prefix: str, workers: int) -> dict:
    """Run verify_image_label over all pairs in a thread pool, keeping input order."""
    out: dict = {"im_files": [], "labels": [], "shapes": [], "segments": [], "msgs": [],
                 "nf": 0, "nm": 0, "ne": 0, "nc": 0, "n": len(im_files)}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for rec in pool.map(verify_image_label, im_files, label_files, [prefix] * len(im_files)):
            for k in ("nf", "nm", "ne", "nc"):
                out[k] += getattr(rec, k)
            if rec.labels is not None:
                out["im_files"].append(rec.im_file)
                out["labels"].append(rec.labels)
                out["shapes"].append(rec.shape)
                out["segments"].append(rec.segments)
            if rec.msg:
                out["msgs"].append(rec.msg)
    out["shapes"] = np.array(out["shapes"], dtype=np.int64).reshape(-1, 2)
    return out


def scan_labels(im_files: Sequence[str], label_files: Sequence[str], cache_path: str | Path | None = None,
                prefix: str = "", workers: int | None = None) -> dict:
    """Verify every image/label pair (or reuse a matching cache) and return the usable ones.

    Returns a dict with ``im_files`` (corrupt pairs dropped, input order kept), ``labels``
    (list of ``(n, 5)`` float32), ``shapes`` (``(N, 2)`` int64 width, height), ``segments``
    (list of lists of ``(k, 2)`` float32 polygons), the counts ``nf`` found, ``nm`` missing,
    ``ne`` empty, ``nc`` corrupt, ``n`` pairs scanned, ``msgs`` (one warning per problem, each
    naming the file), ``hash``, ``from_cache`` and ``cache_path``.

    The cache is keyed by the paths, sizes and mtimes of all files and ``CACHE_VERSION``; a
    stale, foreign or broken cache is rebuilt; an unwritable folder gives one warning.
    """
    if len(im_files) != len(label_files):
        raise ValueError(f"scan_labels: {len(im_files)} images but {len(label_files)} label paths")
    digest = files_hash(list(label_files) + list(im_files))
    cache_path = Path(cache_path) if cache_path is not None else None
    result = load_label_cache(cache_path, digest) if cache_path is not None else None
    from_cache = result is not None
    if result is None:
        workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        result = _verify_all(im_files, label_files, prefix, workers)
        result["hash"] = digest
    where = cache_path if from_cache else (cache_path.parent / cache_path.stem if cache_path else "labels")
    LOGGER.info("%sScanning '%s' images and labels... %d found, %d missing, %d empty, %d corrupt",
                prefix, where, result["nf"], result["nm"], result["ne"], result["nc"])
    for msg in result["msgs"]:
        LOGGER.warning(msg)
    if result["nf"] == 0:
        LOGGER.warning("%sNo labels found in %s", prefix, where)
    if not from_cache and cache_path is not None:
        save_label_cache(cache_path, result, prefix)
    result.update(from_cache=from_cache, cache_path=str(cache_path) if cache_path else None)
    return result
