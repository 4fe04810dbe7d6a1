"""Checkpoints: safe loading of official YOLOv5 files, and our own plain-data format.

Official ``.pt`` files are pickles of whole modules. They are read with
``torch.load(weights_only=True)`` plus an allowlist of exactly the classes they need; a file that
names any other global is refused before anything in it runs. Files we write hold tensors and
plain values only, so they load with ``weights_only=True`` and no allowlist at all.

Example:
    >>> record = read_checkpoint("yolov5s.pt")            # official or ours, float or QAT
    >>> model, meta = build_float_model(record)           # utils.qat.load_model also rebuilds QAT
    >>> save_checkpoint(make_checkpoint(model, epoch=3), "last.pt")
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import struct
import zipfile
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from models.common import C3, SPPF, Bottleneck, Concat, Conv
from models.yolo import Detect, DetectionModel
from utils.names import normalise_names

__all__ = ["CheckpointError", "CheckpointWriteError", "UnsafeCheckpointError", "FORMAT", "FORMAT_VERSION",
           "CheckpointRecord", "load_checkpoint", "read_checkpoint", "build_float_model", "make_checkpoint",
           "save_checkpoint", "is_official", "transfer_state_dict", "check_finite"]

LOGGER = logging.getLogger(__name__)

FORMAT = "yolov5-qat"
FORMAT_VERSION = 1

# Keys make_checkpoint accepts beyond the model itself, with their defaults.
_EXTRA_DEFAULTS: dict[str, Any] = {"epoch": -1, "best_fitness": None, "hyp": None, "opt": None, "quant": None}
_EXTRA_OPTIONAL = ("ema_state_dict", "optimizer", "updates", "date")

# State-dict entries that may exist on one side only: buffers older releases kept.
_TOLERATED_SUFFIXES = ("anchor_grid", "num_batches_tracked")
_RANGE_STATS = ("min_val", "max_val")  # observer statistics; +-inf before the first observation


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not fit the model."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. disk full); the message says which earlier version is intact."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint pickles a global outside the allowlist; nothing in it was executed."""


def _official_allowlist() -> list[tuple[Any, str]]:
    """(object, pickled name) pairs that official YOLOv5 v6.0-v7.0 checkpoints need."""
    ours = [(DetectionModel, "models.yolo.Model"), (DetectionModel, "models.yolo.DetectionModel"),
            (Detect, "models.yolo.Detect"), (Conv, "models.common.Conv"), (C3, "models.common.C3"),
            (Bottleneck, "models.common.Bottleneck"), (SPPF, "models.common.SPPF"),
            (Concat, "models.common.Concat")]
    torch_nn = [nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
                nn.Identity, nn.MaxPool2d, nn.Upsample, nn.Sequential, nn.ModuleList]
    pairs = ours + [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in torch_nn]
    # numpy values in older checkpoints; numpy 2 moved numpy.core to numpy._core.
    try:
        from numpy._core.multiarray import _reconstruct as reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as reconstruct
    pairs += [(reconstruct, "numpy.core.multiarray._reconstruct"),
              (reconstruct, "numpy._core.multiarray._reconstruct"),
              (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for code in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "b1"):
        dtype_cls = type(np.dtype(code))  # e.g. numpy.dtypes.Float64DType, needed to BUILD a dtype
        pairs.append((dtype_cls, f"{dtype_cls.__module__}.{dtype_cls.__qualname__}"))
    return pairs


def _first_sentence(err: BaseException) -> str:
    """Keep error messages to one line: torch's loader errors run to several sentences."""
    if isinstance(err, (KeyError, IndexError, TypeError, AttributeError, struct.error)):
        return f"unreadable pickle data, {type(err).__name__}"  # their text (e.g. '101') says nothing
    text = str(err).strip() or type(err).__name__
    return re.split(r"\.\s|\n", text, maxsplit=1)[0].rstrip(".")


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _unknown_globals(path: Path, allowed: set[str]) -> list[str]:
    """Globals the pickle names that are neither torch's defaults nor ``allowed`` (static scan)."""
    if not zipfile.is_zipfile(path):
        return []  # legacy or damaged file: the restricted unpickler itself still guards it
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, KeyError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_sentence(err)})") from None
    return sorted(n for n in names if n not in allowed)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True`` and the official allowlist.

    Raises UnsafeCheckpointError (naming the global) for anything else a pickle refers to, and
    CheckpointError for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    allowlist = _official_allowlist()
    unknown = _unknown_globals(path, {name for _, name in allowlist})
    if unknown:
        raise UnsafeCheckpointError(f"{path.name}: refused to load, it pickles the unknown global "
                                    f"{unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    try:
        with torch.serialization.safe_globals(allowlist):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        match = _REFUSED_GLOBAL.search(str(err))
        if match:
            raise UnsafeCheckpointError(f"{path.name}: refused to load, it pickles the unknown global "
                                        f"{match.group(1)!r}") from None
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_first_sentence(err)})") from None
    # A damaged or foreign file makes the (restricted) unpickler fail in many ways.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            struct.error, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: damaged or not a torch checkpoint ({_first_sentence(err)})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt


def is_official(ckpt: dict) -> bool:
    """True for upstream-style checkpoints that pickle the model module ('model' / 'ema')."""
    return ckpt.get("format") != FORMAT and isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module)


def _plain(value: Any, where: str) -> Any:
    """Copy ``value`` keeping only data that weights_only loading accepts; Paths become strings."""
    if isinstance(value, np.generic):  # first: np.float64 subclasses float yet weights_only refuses it
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ValueError(f"checkpoint field {where}: {type(value).__name__} is not plain data")


def _state_dict(model_or_state: nn.Module | dict) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def make_checkpoint(model: nn.Module, **extra: Any) -> dict:
    """Our checkpoint dict for a DetectionModel: yaml, state dict, names, stride, plus ``extra``.

    ``extra`` may set epoch, best_fitness, hyp, opt, quant, ema_state_dict (a model or a state
    dict), optimizer (a state dict), updates and date. Everything stored is plain data.
    """
    unknown = set(extra) - set(_EXTRA_DEFAULTS) - set(_EXTRA_OPTIONAL)
    if unknown:
        raise ValueError(f"make_checkpoint: unknown fields {sorted(unknown)}; "
                         f"valid: {sorted(_EXTRA_DEFAULTS) + list(_EXTRA_OPTIONAL)}")
    names = normalise_names(getattr(model, "names", None), "model.names")
    ckpt = {"format": FORMAT, "version": FORMAT_VERSION,
            "model_yaml": _plain(deepcopy(model.yaml), "model_yaml"),
            "state_dict": _state_dict(model),
            "names": names,
            "stride": [float(s) for s in model.stride],
            "nc": int(model.yaml["nc"])}
    if getattr(model, "yaml_file", None):
        ckpt["yaml_file"] = str(model.yaml_file)  # only names the model in summaries
    for key, default in _EXTRA_DEFAULTS.items():
        ckpt[key] = _plain(extra.get(key, default), key)
    for key in _EXTRA_OPTIONAL:
        if key in extra and extra[key] is not None:
            value = extra[key]
            ckpt[key] = _state_dict(value) if key == "ema_state_dict" else _plain(value, key)
    ckpt.setdefault("date", datetime.now().isoformat())
    return ckpt


def _os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save reports a failed write as a RuntimeError whose context it is)."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _write_failure(path: Path, os_err: OSError) -> str:
    """One line: what failed, where, and which version of the file is still good."""
    kept = (f"the previous {path.name} ({datetime.fromtimestamp(path.stat().st_mtime):%Y-%m-%d %H:%M:%S}) "
            "is intact" if path.exists() else f"no earlier {path.name} exists")
    if os_err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free / 1e6
        return f"{path}: disk full while writing the checkpoint ({free:.0f} MB free in {path.parent}); {kept}"
    return f"{path}: could not write the checkpoint ({os_err.strerror or os_err}); {kept}"


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """Write ``ckpt`` atomically: a temporary file in the same folder, fsync, then rename.

    A failed write (e.g. a full disk) leaves any earlier ``path`` untouched and raises CheckpointWriteError,
    one line saying what failed and whether an earlier version of the file is still there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        os_err = _os_error_in(err)
        if os_err is None:
            raise
        raise CheckpointWriteError(_write_failure(path, os_err)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def transfer_state_dict(model: nn.Module, state: dict[str, torch.Tensor], exclude: tuple[str, ...] = ()) -> int:
    """Copy the tensors of ``state`` whose name and shape match ``model``; returns how many.

    Names containing any of ``exclude`` (e.g. 'anchor') are skipped. Used to fine-tune from a
    checkpoint with another class count.
    """
    own = model.state_dict()
    chosen = {k: v for k, v in state.items()
              if k in own and v.shape == own[k].shape and not any(x in k for x in exclude)}
    model.load_state_dict(chosen, strict=False)
    return len(chosen)


def check_finite(path: str | Path, state: dict, entry: str = "state_dict") -> None:
    """Raise CheckpointError naming the file and the first tensor of ``state`` holding NaN or inf.

    Observer range statistics (``min_val``/``max_val`` of fake quantizers) are skipped: +-inf there means
    "nothing observed yet", which a QAT checkpoint may legitimately hold.
    """
    for name, value in state.items():
        if name.rsplit(".", 1)[-1] in _RANGE_STATS:
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{path}: {entry} tensor {name!r} holds {bad} non-finite values (nan/inf); "
                                  "these weights are unusable (a diverged run?), use an earlier checkpoint")


def _check_keys(path: Path, own: dict, state: dict) -> None:
    """Raise CheckpointError unless the key sets and shapes agree (tolerating old buffers)."""
    def relevant(keys):
        return sorted(k for k in keys if not k.endswith(_TOLERATED_SUFFIXES))

    missing, unexpected = relevant(own.keys() - state.keys()), relevant(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not fit the model yaml; missing {missing[:4]}"
                              f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                              f"{'...' if len(unexpected) > 4 else ''}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
           if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad)} tensors, e.g. {'; '.join(sorted(bad)[:3])}")


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint of either format holds, in one shape (see :func:`read_checkpoint`).

    ``state`` is the weights to evaluate (EMA when present, as upstream's attempt_load);
    ``train_state`` the weights training continues from (the raw, non-EMA ones when there are any);
    ``quant`` the QAT entry (None for a float model); ``raw`` the loaded dict (optimizer, epoch, ...).
    """

    path: Path
    format: str  # FORMAT or "official"
    yaml: dict
    state: dict
    train_state: dict
    names: dict[int, str]
    stride: Optional[list[float]]
    quant: Optional[dict]
    weights: str  # which entry ``state`` came from: state_dict, ema_state_dict, ema or model
    yaml_file: Optional[str]
    raw: dict = field(repr=False)

    @property
    def epoch(self) -> int:
        return int(self.raw.get("epoch", -1))


def _own_record(path: Path, ckpt: dict) -> CheckpointRecord:
    if ckpt.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {ckpt.get('version')} is newer than "
                              f"this code reads ({FORMAT_VERSION})")
    which = "ema_state_dict" if ckpt.get("ema_state_dict") else "state_dict"
    quant = ckpt.get("quant")
    return CheckpointRecord(path, FORMAT, ckpt["model_yaml"], ckpt[which],
                            ckpt.get("train_state_dict") or ckpt["state_dict"],
                            normalise_names(ckpt.get("names"), str(path)), _floats(ckpt.get("stride")),
                            quant if isinstance(quant, dict) and quant else None, which,
                            ckpt.get("yaml_file"), ckpt)


def _official_record(path: Path, ckpt: dict) -> CheckpointRecord:
    which = "ema" if ckpt.get("ema") is not None else "model"
    module = ckpt[which]
    if not isinstance(getattr(module, "yaml", None), dict):
        raise CheckpointError(f"{path}: the pickled model has no yaml to rebuild it from")
    state = module.state_dict()
    train_module = ckpt.get("model") or ckpt.get("ema")  # training starts from the raw weights
    train_state = train_module.float().state_dict()
    return CheckpointRecord(path, "official", module.yaml, state, train_state,
                            normalise_names(getattr(module, "names", None), str(path)),
                            _floats(getattr(module, "stride", None)), None, which,
                            getattr(module, "yaml_file", None), ckpt)


def _floats(stride: Any) -> Optional[list[float]]:
    if stride is None:
        return None
    return [float(s) for s in (stride.tolist() if isinstance(stride, torch.Tensor) else stride)]


def _checked(record: CheckpointRecord) -> CheckpointRecord:
    """The record, once its weights (evaluated and trained) are known to be finite."""
    check_finite(record.path, record.state, record.weights)
    if record.train_state is not record.state:
        check_finite(record.path, record.train_state, "train_state_dict")
    return record


def read_checkpoint(path: str | Path) -> CheckpointRecord:
    """Load a checkpoint of either format (safely, see :func:`load_checkpoint`) into a record.

    Example:
        >>> rec = read_checkpoint("best.pt")
        >>> rec.names, rec.quant is not None      # class names, QAT or float
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    if ckpt.get("format") == FORMAT:
        return _checked(_own_record(path, ckpt))
    if is_official(ckpt):
        return _checked(_official_record(path, ckpt))
    raise CheckpointError(f"{path}: neither an official YOLOv5 checkpoint nor format {FORMAT!r} "
                          f"(keys: {sorted(map(str, ckpt))[:6]})")


def build_float_model(record: CheckpointRecord, device: Any = "cpu", act: Any = None,
                      fuse: bool = False) -> tuple[DetectionModel, dict]:
    """A fresh float DetectionModel from a record's yaml and (EMA) weights; returns (model, meta).

    Weights become float32, the model is in eval mode. ``act`` rebuilds with another activation
    (e.g. 'relu' to fine-tune). ``fuse`` folds BatchNorm and freezes the parameters, for inference.
    meta holds format, epoch, names, nc, stride, source and weights (which entry was used).
    A QAT record is rebuilt by :func:`utils.qat.load_model` instead.
    """
    path = record.path
    model = DetectionModel(deepcopy(record.yaml), act=act)
    own = model.state_dict()
    _check_keys(path, own, record.state)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in record.state.items() if k in own}
    model.load_state_dict(state, strict=False)
    model.names = record.names or model.names
    if record.yaml_file:
        model.yaml_file = str(record.yaml_file)
    if record.stride is not None and record.stride != model.stride.tolist():
        LOGGER.warning("%s: checkpoint stride %s differs from the rebuilt model's %s",
                       path, record.stride, model.stride.tolist())
    model = model.to(device).eval()
    if fuse:
        model.fuse().requires_grad_(False)  # inference only: upstream reports "0 gradients" here
    meta = {"format": record.format if record.format == FORMAT else "official",
            "epoch": record.epoch, "names": model.names, "nc": int(model.yaml["nc"]),
            "stride": model.stride.tolist(), "source": str(path), "weights": record.weights}
    return model, meta
