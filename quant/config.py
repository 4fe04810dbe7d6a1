"""Quantization configuration: frozen dataclasses, per-layer rules and yaml round trips.

A :class:`QuantConfig` says how weights, activations and the model input are quantized by
default, and a tuple of :class:`LayerRule` overrides those defaults for chosen layers.  The
config knows nothing of any particular model: layers are addressed by module name (exact or
``fnmatch`` glob) or by an integer layer index that the caller supplies (YOLO's row number).

Example::

    cfg = QuantConfig.from_yaml("data/quant/default.yaml")
    quantize, w_spec, a_spec = cfg.resolve("model.24.m.0", layer_index=24)
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import yaml

ROUNDING_MODES = ("ceil", "round", "mse")
OBSERVERS = ("ema_minmax", "minmax", "current", "histogram")
BN_MODES = ("simulate", "fold")
_GLOB_CHARS = frozenset("*?[")
_LAYER_PREFIX = "layer:"


class FrozenDict(dict):
    """A read-only, hashable dict (rule overrides must not change after a config is built)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"rule overrides are read-only: {dict(self)}")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):
        # dict's default reduce refills through __setitem__, which is blocked here.
        return (FrozenDict, (dict(self),))


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized (zero point is always 0).

    ``signed=None`` leaves the choice to the graph (unsigned after ReLU/ReLU6, signed otherwise).
    The scale is ``2**k / 2**(bits-1)`` when signed and ``2**k / 2**bits`` when unsigned, so values
    up to about ``2**k`` in magnitude are representable; ``k`` comes from the observed bound by the
    ``rounding`` rule, or is pinned by ``fixed_exponent`` (which disables the observer).
    ``observer``: 'ema_minmax' (moving average of batch min/max), 'minmax' (running extreme since
    the last reset), 'current' (the tensor of the latest forward only) or 'histogram' (per tensor: a
    histogram of every observed value, see quant.histogram; with ``rounding: mse`` k minimises the
    squared error over all of them, with 'ceil'/'round' k covers the ``percentile`` of magnitudes).
    ``trained_threshold``: during QAT the exponent is ``round(t)`` of a learned log2 threshold ``t``
    (TQT), initialised from calibration and trained by gradient after the observer freezes
    (see quant.threshold); ignored for a fixed exponent.
    """

    bits: int = 8
    signed: Optional[bool] = None
    per_channel: bool = False
    ch_axis: int = 0
    rounding: str = "round"
    observer: str = "ema_minmax"
    averaging_constant: float = 0.01
    fixed_exponent: Optional[int] = None
    percentile: float = 100.0
    trained_threshold: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be an int in [2, 16], got {self.bits!r}")
        if self.signed not in (None, True, False):
            raise ValueError(f"QuantSpec.signed must be true, false or null, got {self.signed!r}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"QuantSpec.rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer must be one of {OBSERVERS}, got {self.observer!r}")
        if not 0.0 < float(self.averaging_constant) <= 1.0:
            raise ValueError(f"QuantSpec.averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        fixed = self.fixed_exponent
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int) or not -32 <= fixed <= 32):
            # beyond +-32 the scale over- or underflows: NaN outputs or every value quantized to 0
            raise ValueError(f"QuantSpec.fixed_exponent must be an int in [-32, 32] or null, got {fixed!r}")
        for name in ("per_channel", "trained_threshold"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantSpec.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int):
            raise ValueError(f"QuantSpec.ch_axis must be an int, got {self.ch_axis!r}")
        pct = self.percentile
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 50.0 <= float(pct) <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be a number in [50, 100], got {pct!r}")
        if self.observer == "histogram" and self.per_channel:
            raise ValueError("QuantSpec.observer 'histogram' is per tensor; use 'current' or 'minmax' per channel")

    def replace(self, overrides: Mapping[str, Any]) -> "QuantSpec":
        """Return a copy with ``overrides`` applied (unknown field names raise ValueError)."""
        _check_keys(overrides, _field_names(QuantSpec), "QuantSpec override")
        return dataclasses.replace(self, **dict(overrides)) if overrides else self


@dataclass(frozen=True)
class LayerRule:
    """A per-layer override.

    ``pattern`` is an exact module name, an ``fnmatch`` glob such as ``'model.24.*'``, or
    ``'layer:<i>'`` which matches when the caller's layer index equals ``i``.  ``float=True`` keeps
    the layer unquantized (weights and output activation); ``weight`` / ``activation`` hold
    :class:`QuantSpec` field overrides, e.g. ``{'bits': 16}``.
    """

    pattern: str
    float: bool = False
    weight: Mapping[str, Any] = field(default_factory=FrozenDict)
    activation: Mapping[str, Any] = field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LayerRule.pattern must be a non-empty string, got {self.pattern!r}")
        if not isinstance(self.float, bool):
            raise ValueError(f"LayerRule {self.pattern!r}: float must be true or false, got {self.float!r}")
        if self.kind == "layer":
            index = self.pattern[len(_LAYER_PREFIX):]
            if not index.lstrip("-").isdigit():
                raise ValueError(f"LayerRule.pattern {self.pattern!r}: expected 'layer:<int>'")
        for name in ("weight", "activation"):
            overrides = getattr(self, name)
            if not isinstance(overrides, Mapping):
                raise ValueError(f"LayerRule {self.pattern!r}: {name} must be a mapping, got {overrides!r}")
            QuantSpec().replace(overrides)  # validates keys and values now, not at resolve time
            object.__setattr__(self, name, FrozenDict(overrides))

    @property
    def kind(self) -> str:
        """'layer', 'glob' or 'exact': which stage of :meth:`QuantConfig.resolve` this rule joins."""
        if self.pattern.startswith(_LAYER_PREFIX):
            return "layer"
        return "glob" if _GLOB_CHARS & set(self.pattern) else "exact"

    def matches(self, module_name: str, layer_index: Optional[int]) -> bool:
        """True when this rule applies to ``module_name`` / ``layer_index``."""
        kind = self.kind
        if kind == "layer":
            return layer_index is not None and int(self.pattern[len(_LAYER_PREFIX):]) == layer_index
        if kind == "glob":
            return fnmatch.fnmatchcase(module_name, self.pattern)
        return module_name == self.pattern

    def to_dict(self) -> dict:
        """Plain-python form for yaml."""
        return {"pattern": self.pattern, "float": self.float,
                "weight": dict(self.weight), "activation": dict(self.activation)}


@dataclass(frozen=True)
class QuantConfig:
    """Whole-model quantization settings plus per-layer rules (see :meth:`resolve`)."""

    weight: QuantSpec = QuantSpec(per_channel=True, signed=True, observer="current")
    activation: QuantSpec = QuantSpec()
    # Images in [0, 1] become uint8 with scale 2**0 / 2**8 = 1/256.
    input: QuantSpec = QuantSpec(signed=False, fixed_exponent=0)
    quantize_input: bool = True
    bn_mode: str = "simulate"
    # PTQ (and the calibration a QAT run starts from): remove the mean output shift weight
    # quantization causes, per conv channel (quant.bias_correction).
    bias_correction: bool = False
    # PTQ: learn each weight's rounding direction on calibration images (quant.adaround) instead of
    # rounding to nearest; slower (minutes on CPU for a small detector).
    learned_rounding: bool = False
    rules: tuple = ()
    leaf_modules: tuple = ()

    def __post_init__(self) -> None:
        for name in ("weight", "activation", "input"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise ValueError(f"QuantConfig.{name} must be a QuantSpec, got {getattr(self, name)!r}")
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"QuantConfig.bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}")
        for name in ("quantize_input", "bias_correction", "learned_rounding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name} must be true or false, got {getattr(self, name)!r}")
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, LayerRule):
                raise ValueError(f"QuantConfig.rules must hold LayerRule objects, got {rule!r}")
        leaves = tuple(self.leaf_modules)
        for leaf in leaves:
            if not isinstance(leaf, str):
                raise ValueError(f"QuantConfig.leaf_modules must hold class names, got {leaf!r}")
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "leaf_modules", leaves)

    def unmatched_rules(self, names: Iterable[str], index_of: Callable[[str], Optional[int]]) -> list[LayerRule]:
        """The rules that match none of ``names`` (module names; ``index_of`` gives their layer index)."""
        names = list(names)
        return [r for r in self.rules if not any(r.matches(n, index_of(n)) for n in names)]

    def find_rule(self, module_name: str, layer_index: Optional[int] = None) -> Optional[LayerRule]:
        """The rule that applies: first exact name, else first glob, else first 'layer:<i>', else None."""
        for kind in ("exact", "glob", "layer"):
            for rule in self.rules:
                if rule.kind == kind and rule.matches(module_name, layer_index):
                    return rule
        return None

    def resolve(self, module_name: str, layer_index: Optional[int] = None) -> tuple[bool, QuantSpec, QuantSpec]:
        """Return ``(quantize, weight_spec, activation_spec)`` for one layer.

        Only one rule applies (see :meth:`find_rule` for the order); its overrides are applied on
        top of the config-wide ``weight`` / ``activation`` specs.  ``quantize`` is False when the
        rule says ``float: true``.
        """
        rule = self.find_rule(module_name, layer_index)
        if rule is None:
            return True, self.weight, self.activation
        return not rule.float, self.weight.replace(rule.weight), self.activation.replace(rule.activation)

    # ---- plain dict / yaml -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "QuantConfig":
        """Build from plain data; missing keys keep the defaults, spec dicts override field by field.

        ``source`` names the origin (a file path) in error messages.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: quantization config must be a mapping, got {type(data).__name__}")
        _check_keys(data, _field_names(cls), f"{source}: quantization config")
        base = cls()
        kwargs: dict[str, Any] = {}
        try:
            for name in ("weight", "activation", "input"):
                if name in data:
                    kwargs[name] = _spec_from(getattr(base, name), data[name], f"{source}: {name}")
            for name in ("quantize_input", "bn_mode", "bias_correction", "learned_rounding"):
                if name in data:
                    kwargs[name] = data[name]
            if "leaf_modules" in data:
                kwargs["leaf_modules"] = tuple(data["leaf_modules"] or ())
            if "rules" in data:
                kwargs["rules"] = tuple(_rule_from(r, f"{source}: rules[{i}]")
                                        for i, r in enumerate(data["rules"] or ()))
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            message = str(err)
            raise ValueError(message if message.startswith(source) else f"{source}: {message}") from None

    @classmethod
    def from_yaml(cls, path: Union[str, Path], base: Optional[Mapping[str, Any]] = None) -> "QuantConfig":
        """Load a yaml file (see data/quant/*.yaml); errors name the file and the offending key.

        With ``base`` (plain data of another config), the file is layered on it (see :func:`layered`):
        a file holding only ``rules:`` keeps everything else from ``base``.
        """
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as err:  # one line naming the file, not PyYAML's multi-line message
                mark = getattr(err, "problem_mark", None)
                at = f" at line {mark.line + 1}" if mark is not None else ""
                raise ValueError(f"{path}: not valid yaml ({getattr(err, 'problem', None) or err}{at})") from None
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"{path}: quantization config must be a mapping, got {type(data).__name__}")
        return cls.from_dict(layered(base, data or {}) if base is not None else data or {}, source=str(path))

    def to_dict(self) -> dict:
        """Plain-python form; ``QuantConfig.from_dict(cfg.to_dict()) == cfg``."""
        return {
            "weight": dataclasses.asdict(self.weight),
            "activation": dataclasses.asdict(self.activation),
            "input": dataclasses.asdict(self.input),
            "quantize_input": self.quantize_input,
            "bn_mode": self.bn_mode,
            "bias_correction": self.bias_correction,
            "learned_rounding": self.learned_rounding,
            "rules": [rule.to_dict() for rule in self.rules],
            "leaf_modules": list(self.leaf_modules),
        }

    def to_yaml(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_dict` as yaml (saved beside training results)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def layered(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    """``top`` over ``base``: the spec mappings (weight, activation, input) merge field by field, every
    other key given in ``top`` (rules, leaf_modules, ...) replaces base's."""
    out = dict(base)
    for key, value in top.items():
        if key in ("weight", "activation", "input") and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _spec_from(base: QuantSpec, data: Any, where: str) -> QuantSpec:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of QuantSpec fields, got {data!r}")
    _check_keys(data, _field_names(QuantSpec), where)
    return base.replace(data)


def _rule_from(data: Any, where: str) -> LayerRule:
    if isinstance(data, LayerRule):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'pattern', got {data!r}")
    _check_keys(data, _field_names(LayerRule), where)
    if "pattern" not in data:
        raise ValueError(f"{where}: missing key 'pattern'")
    for name in ("weight", "activation"):
        if name in data and data[name] is not None:
            _spec_from(QuantSpec(), data[name], f"{where}.{name}")
    clean = {k: (v if v is not None else {}) if k in ("weight", "activation") else v for k, v in data.items()}
    return LayerRule(**clean)
