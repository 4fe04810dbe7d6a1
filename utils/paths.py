"""Repository root, run-folder naming (runs/train/exp, exp2, ...), file sizes and a writability probe."""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # repository root: utils/ lives directly under it


class RunDirError(OSError):
    """A run folder that cannot be created or written to."""


def _claim_dir(path: Path, sep: str) -> Path:
    """Create the first free folder ``path``, ``path{sep}2``, ... with an atomic mkdir: a run started at the
    same moment that created the same name first makes this one take the next number."""
    for n in range(1, 10000):
        candidate = path if n == 1 else Path(f"{path}{sep}{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise RunDirError(f"{candidate}: run folder is not writable ({e.strerror or e})") from e
    raise RunDirError(f"{path}: no free numbered name up to {path}{sep}9999")


def increment_path(path: str | os.PathLike, exist_ok: bool = False, sep: str = "",
                   mkdir: bool = False, claim: bool = False) -> Path:
    """Return ``path``, or the first free ``path{sep}2``, ``path{sep}3``, ... when it already exists.

    For an existing file the number goes before the suffix (``a.txt`` -> ``a2.txt``). With
    ``exist_ok`` an existing path is reused as is. ``mkdir`` creates the resulting directory.
    ``claim`` (folders, without ``exist_ok``) creates it atomically, so concurrent runs never share one.
    Example: with runs/val/exp present, ``increment_path('runs/val/exp')`` is ``runs/val/exp2``.
    """
    path = Path(path)
    if claim and not exist_ok and not path.is_file():
        return _claim_dir(path, sep)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        for n in range(2, 10000):
            candidate = Path(f"{stem}{sep}{n}{suffix}")
            if not candidate.exists():
                path = candidate
                break
        else:
            raise RunDirError(f"{path}: no free numbered name up to {stem}{sep}9999{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def file_size(path: str | os.PathLike) -> float:
    """Size in MiB of a file, or of every file under a directory; 0.0 when the path does not exist."""
    path = Path(path)
    mib = 1 << 20
    if path.is_file():
        return path.stat().st_size / mib
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / mib
    return 0.0


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (with parents) and prove it is writable by writing and deleting a probe file.

    Called before training starts so a bad ``--project`` fails in one line instead of after an epoch.
    Raises :class:`RunDirError` (an ``OSError``) naming the folder and the reason.
    """
    path = Path(path)
    probe = path / f".write_probe_{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{path}: run folder is not writable ({e.strerror or e})") from e
    return path
