"""Checks of a model yaml (keys, types, layer rows), and the small typed-field helpers every yaml check of
the project reuses (utils.config_checks builds the dataset, hyperparameter and flag checks on them).
They live in models/ because building a model from a yaml must not reach into utils/.

Example:
    >>> check_model_yaml(read_yaml("models/yolov5n.yaml", "model"), "models/yolov5n.yaml")  # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A yaml value or flag that is missing, of the wrong type or out of range; the message names where."""


@dataclass(frozen=True)
class Field:
    """A numeric field: ``kind`` 'number' (int or float) or 'int'; bounds inclusive unless ``*_open``."""

    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allowed(self) -> str:
        """The allowed values in words, e.g. 'a number in [0, 1)' or 'an integer >= 1'."""
        what = "an integer" if self.kind == "int" else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi:g}"
        return what

    def ok(self, value: Any) -> bool:
        """True when ``value`` has the right type (never bool or str) and lies in range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)


def check_field(where: str, key: str, value: Any, field: Field, error: type[ValueError] = ConfigError) -> Any:
    """Return ``value`` if ``field`` accepts it, else raise ``error`` naming ``where``, ``key`` and the range."""
    if not field.ok(value):
        raise error(f"{where}: {key!r} must be {field.allowed()}, got {value!r} ({type(value).__name__})")
    return value


def read_yaml(file: str | Path, what: str) -> Any:
    """Parse a yaml file; a missing file or bad syntax is one line naming the file (``what`` says which kind)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: {what} yaml not found")
    try:
        with open(file, encoding="utf-8", errors="replace") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid yaml ({yaml_error_line(err)})") from None


def yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


MODEL_FIELDS = {"nc": Field("int", lo=1), "depth_multiple": Field(lo=0, lo_open=True),
                "width_multiple": Field(lo=0, lo_open=True), "ch": Field("int", lo=1)}
_FROM_HINT = "an integer layer index or a list of them"


def _check_anchors(source: str, anchors: Any) -> None:
    if isinstance(anchors, list):
        rows_ok = anchors and all(isinstance(r, list) and r and len(r) % 2 == 0 and len(r) == len(anchors[0])
                                  and all(Field(lo=0, lo_open=True).ok(v) for v in r) for r in anchors)
        if rows_ok:
            return
    elif Field("int", lo=1).ok(anchors):
        return
    raise ConfigError(f"{source}: 'anchors' must be an integer >= 1 or one list of positive w,h pairs per "
                      f"output level (all the same length), got {anchors!r}")


def _check_layer_row(source: str, i: int, row: Any) -> None:
    if not isinstance(row, (list, tuple)) or len(row) != 4:
        raise ConfigError(f"{source}: layer {i} must be [from, number, module, args], got {row!r}")
    f, n, name, args = row
    ints = f if isinstance(f, list) else [f]
    if not ints or not all(Field("int").ok(x) for x in ints):
        raise ConfigError(f"{source}: layer {i} 'from' must be {_FROM_HINT}, got {f!r}")
    check_field(source, f"layer {i} number", n, Field("int", lo=1))
    if not isinstance(name, str):
        raise ConfigError(f"{source}: layer {i} module must be a block name (e.g. Conv), got {name!r}")
    if not isinstance(args, list):
        raise ConfigError(f"{source}: layer {i} args must be a list, got {args!r}")


def check_model_yaml(d: Any, source: str) -> dict:
    """Keys and types of a model yaml dict (layer arguments are checked when the layer is built)."""
    if not isinstance(d, dict) or "backbone" not in d or "head" not in d:
        raise ConfigError(f"{source}: not a model yaml (needs 'backbone' and 'head')")
    if "nc" not in d:
        raise ConfigError(f"{source}: 'nc' (number of classes) missing; allowed: {MODEL_FIELDS['nc'].allowed()}")
    for key, field in MODEL_FIELDS.items():
        if key in d:
            check_field(source, key, d[key], field)
    if "anchors" not in d:
        raise ConfigError(f"{source}: 'anchors' missing (an integer or lists of w,h pairs per output level)")
    _check_anchors(source, d["anchors"])
    for part in ("backbone", "head"):
        if not isinstance(d[part], list) or not d[part]:
            raise ConfigError(f"{source}: {part!r} must be a non-empty list of [from, number, module, args] rows")
    for i, row in enumerate(d["backbone"] + d["head"]):
        _check_layer_row(source, i, row)
    if "activation" in d and d["activation"] is not None and not isinstance(d["activation"], str):
        raise ConfigError(f"{source}: 'activation' must be a name such as relu or silu, got {d['activation']!r}")
    return d
