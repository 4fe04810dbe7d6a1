"""One validation layer for what users write: the yaml files the project reads (dataset, hyperparameters,
model) and the scripts' numeric flags.

Each value is checked against a :class:`Field` (its type and allowed range); a bad one raises
:class:`ConfigError` in one line naming the file (or flag), the key and the allowed values, e.g.::

    data/hyps/my.yaml: 'lr0' must be a number > 0, got 'abc' (str)

Example:
    >>> hyp = check_hyp_values(read_yaml("data/hyps/hyp.scratch-low.yaml", "hyperparameter"), "hyp.yaml")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from models.yaml_checks import ConfigError, Field, check_field, check_model_yaml, read_yaml, yaml_error_line

__all__ = ["ConfigError", "Field", "check_field", "check_flags", "check_hyp_values", "check_model_yaml", "read_yaml",
           "yaml_error_line"]


# ------------------------------------------------------------------------------------ hyperparameters
_UNIT = Field(lo=0, hi=1)  # probabilities and gains in [0, 1]
HYP_FIELDS: dict[str, Field] = {
    "lr0": Field(lo=0, lo_open=True), "lrf": Field(lo=0), "momentum": Field(lo=0, hi=1, hi_open=True),
    "weight_decay": Field(lo=0), "warmup_epochs": Field(lo=0), "warmup_momentum": Field(lo=0, hi=1, hi_open=True),
    "warmup_bias_lr": Field(lo=0), "box": Field(lo=0), "cls": Field(lo=0), "cls_pw": Field(lo=0, lo_open=True),
    "obj": Field(lo=0), "obj_pw": Field(lo=0, lo_open=True), "iou_t": _UNIT, "anchor_t": Field(lo=1),
    "fl_gamma": Field(lo=0), "hsv_h": _UNIT, "hsv_s": _UNIT, "hsv_v": _UNIT, "degrees": Field(lo=0, hi=180),
    "translate": _UNIT, "scale": Field(lo=0, hi=1, hi_open=True), "shear": Field(lo=0, hi=90, hi_open=True),
    "perspective": Field(lo=0, hi=0.01), "flipud": _UNIT, "fliplr": _UNIT, "mosaic": _UNIT, "mixup": _UNIT,
    "copy_paste": _UNIT, "anchors": Field("int", lo=0), "label_smoothing": Field(lo=0, hi=1, hi_open=True),
    "ema_decay": Field(lo=0, hi=1, hi_open=True),
    "lr_threshold": Field(lo=0), "distill": Field(lo=0),
}


def check_hyp_values(hyp: Mapping[str, Any], source: str | Path) -> Mapping[str, Any]:
    """Type and range of every known hyperparameter (unknown keys are left to the caller's warning)."""
    for key, value in hyp.items():
        if key in HYP_FIELDS:
            check_field(str(source), key, value, HYP_FIELDS[key])
    return hyp


# --------------------------------------------------------------------------------------------- flags
# option name -> (flag, allowed values); a script checks the options it has, before any work starts
FLAG_FIELDS: dict[str, tuple[str, Field]] = {
    "imgsz": ("--imgsz", Field("int", lo=32, hi=8192)), "batch_size": ("--batch-size", Field("int", lo=1)),
    "epochs": ("--epochs", Field("int", lo=1)), "workers": ("--workers", Field("int", lo=0)),
    "freeze": ("--freeze", Field("int", lo=0)), "patience": ("--patience", Field("int", lo=0)),
    "label_smoothing": ("--label-smoothing", Field(lo=0, hi=1, hi_open=True)),
    "qat_observer_epochs": ("--qat-observer-epochs", Field(lo=0)),
    "qat_observer_every": ("--qat-observer-every", Field("int", lo=1)),
    "qat_freeze_bn_epoch": ("--qat-freeze-bn-epoch", Field("int", lo=-1)),
    "qat_calib_images": ("--qat-calib-images", Field("int", lo=0)),
    "target_drop": ("--target-drop", Field(lo=0)),
    "conf_thres": ("--conf-thres", Field(lo=0, hi=1)), "iou_thres": ("--iou-thres", Field(lo=0, hi=1)),
    "max_det": ("--max-det", Field("int", lo=1)), "calib_images": ("--calib-images", Field("int", lo=1)),
}
_FLAG_HINTS = {"batch_size": " (AutoBatch, --batch-size -1, is not supported here)"}


def check_flags(opt: Mapping[str, Any], names: tuple[str, ...] | None = None) -> None:
    """Range-check a script's numeric options (``names``, default every known one present in ``opt``).

    Raises ConfigError such as ``--batch-size 0: must be an integer >= 1``.
    """
    for key in names or tuple(FLAG_FIELDS):
        if key not in opt or opt[key] is None:
            continue
        flag, field = FLAG_FIELDS[key]
        values = opt[key] if isinstance(opt[key], (list, tuple)) else [opt[key]]
        if not values:
            raise ConfigError(f"{flag}: needs a value, {field.allowed()}")
        for v in values:
            if not field.ok(v):
                raise ConfigError(f"{flag} {v!r}: must be {field.allowed()}{_FLAG_HINTS.get(key, '')}")
