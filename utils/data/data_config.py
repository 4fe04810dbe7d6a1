"""Dataset yaml files: load, validate and resolve them the way YOLOv5 v7.0 users write them.

A dataset yaml names a root folder (``path``), the image sources of each split (``train``,
``val``, optional ``test``: a folder, a ``.txt`` list of images, or a list of those) and the
class names (``names``: a list, or a mapping ``{index: name}``)::

    path: ../datasets/coco128
    train: images/train2017
    val: images/train2017
    names: {0: person, 1: bicycle}

Where a relative ``path`` points
--------------------------------
Upstream resolves a relative ``path`` against its own repository folder. Our yaml files may live
anywhere, so we try, in order, and keep the first folder that exists:

1. the folder holding the yaml file (absent when a dict is given),
2. the current working directory,
3. this repository's root (upstream's rule, so its ``../datasets/...`` entries keep working).

When none of them exists the first candidate is kept, and the missing ``val`` path is reported.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import yaml

from utils.config_checks import Field, check_field, yaml_error_line
from utils.paths import ROOT as REPO_ROOT

LOGGER = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataConfigError(ValueError):
    """A dataset yaml that is missing, unreadable or inconsistent; the message names the file."""


def _read_yaml(file: Path) -> dict:
    if not file.is_file():
        raise DataConfigError(f"{file}: dataset yaml not found")
    try:
        with open(file, encoding="utf-8", errors="ignore") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DataConfigError(f"{file}: not valid yaml ({yaml_error_line(e)})") from e
    if not isinstance(data, dict):
        raise DataConfigError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_names(names: Any, where: str) -> dict[int, str]:
    """Turn a names list or mapping into ``{int: str}`` with keys 0..nc-1."""
    if isinstance(names, (list, tuple)):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        out = {}
        for k, v in names.items():
            # yaml may read `0: person` with an int key, but a quoted key arrives as a string
            if isinstance(k, bool) or not (isinstance(k, int) or (isinstance(k, str) and k.isdigit())):
                raise DataConfigError(f"{where}: 'names' keys must be class indices (e.g. 2: car), got {k!r}")
            out[int(k)] = str(v)
        if sorted(out) != list(range(len(out))):
            raise DataConfigError(f"{where}: 'names' keys must be 0..{len(out) - 1}, got {sorted(out)}")
        return dict(sorted(out.items()))
    raise DataConfigError(f"{where}: 'names' must be a list or a mapping, got {type(names).__name__}")


def _check_fields(raw: dict, where: str, n_names: int) -> None:
    """Types of the keys we read: nc an integer matching names, path a folder name, splits paths."""
    if n_names == 0:
        raise DataConfigError(f"{where}: 'names' is empty; give at least one class name")
    if raw.get("nc") is not None:
        check_field(where, "nc", raw["nc"], Field("int", lo=1), error=DataConfigError)
        if raw["nc"] != n_names:
            raise DataConfigError(f"{where}: nc={raw['nc']} but {n_names} names are given")
    if raw.get("path") is not None and not isinstance(raw["path"], str):
        raise DataConfigError(f"{where}: 'path' must be a folder name, got {raw['path']!r}")
    for split in SPLITS:
        value = raw.get(split)
        items = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(x, str) for x in items):
            raise DataConfigError(f"{where}: {split!r} must be a folder, an images .txt list or a list of "
                                  f"those, got {value!r}")


def resolve_root(path_value: Any, yaml_dir: Path | None) -> Path:
    """Pick the dataset root folder (see the module docstring for the order of candidates)."""
    root = Path(str(path_value or "")).expanduser()
    if root.is_absolute():
        return root.resolve()
    bases = ([yaml_dir] if yaml_dir is not None else []) + [Path.cwd(), REPO_ROOT]
    candidates = [(base / root).resolve() for base in bases]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def _resolve_split(value: Any, root: Path) -> str | list[str]:
    """Make a split's source(s) absolute against ``root``."""
    if isinstance(value, (list, tuple)):
        return [str((root / str(x)).resolve()) for x in value]
    text = str(value)
    x = (root / text).resolve()
    # upstream quirk kept for old yamls: '../x' that does not exist is retried as 'x' under root
    if not x.exists() and text.startswith("../"):
        x = (root / text[3:]).resolve()
    return str(x)


def load_data_config(data: str | Path | dict, autodownload: bool = False) -> dict:
    """Load a dataset yaml (or an already-loaded dict) and resolve its paths.

    Returns a new dict with ``path`` (absolute root, str), ``train``/``val``/``test`` made
    absolute (str or list of str; absent or empty splits stay as given), ``names`` as
    ``{int: str}``, ``nc``, ``download`` (kept, never run here) and ``yaml_file`` (str or None).

    ``autodownload`` is accepted for upstream compatibility; downloading is not done here, so a
    missing ``val`` path is always an error.

    Raises:
        DataConfigError: file missing, bad yaml, no ``names`` or ``val``, ``nc`` disagreeing with
            ``names``, or a ``val`` path that does not exist (the message names the path).

    Example:
        >>> cfg = load_data_config("data/coco128.yaml")  # doctest: +SKIP
        >>> cfg["nc"], cfg["val"]  # doctest: +SKIP
    """
    if isinstance(data, dict):
        raw, yaml_file, where = dict(data), None, "dataset dict"
    else:
        yaml_file = Path(data).expanduser().resolve()
        raw, where = _read_yaml(yaml_file), str(yaml_file)

    for key in ("names", "val"):
        if key not in raw or raw[key] is None:
            raise DataConfigError(f"{where}: '{key}:' field missing")
    names = _parse_names(raw["names"], where)
    _check_fields(raw, where, len(names))

    root = resolve_root(raw.get("path"), yaml_file.parent if yaml_file else None)
    cfg = dict(raw)
    cfg.update(path=str(root), names=names, nc=len(names), yaml_file=str(yaml_file) if yaml_file else None)
    cfg["download"] = raw.get("download")
    for split in SPLITS:
        if raw.get(split):
            cfg[split] = _resolve_split(raw[split], root)

    vals = cfg["val"] if isinstance(cfg["val"], list) else [cfg["val"]]
    missing = [v for v in vals if not Path(v).exists()]
    if missing:
        hint = " (the yaml has a 'download' entry: run download_dataset)" if cfg["download"] else ""
        raise DataConfigError(f"{where}: val path not found: {', '.join(missing)}{hint}")
    if autodownload:
        LOGGER.debug("autodownload requested for %s; nothing to download, all val paths exist", where)
    return cfg


def _make_divisible(x: float, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list[int], stride: int = 32, floor: int = 0) -> int | list[int]:
    """Round an image size (or list of sizes) up to a multiple of ``stride``, at least ``floor``.

    Logs a warning when the size had to change, as upstream does.

    Example:
        >>> check_img_size(641)  # warns, returns 672
        672
    """
    s = int(stride)
    if isinstance(imgsz, int):
        new_size: int | list[int] = max(_make_divisible(imgsz, s), floor)
    else:
        imgsz = list(imgsz)
        new_size = [max(_make_divisible(x, s), floor) for x in imgsz]
    if new_size != imgsz:
        LOGGER.warning("--img-size %s must be multiple of max stride %d, updating to %s", imgsz, s, new_size)
    return new_size
