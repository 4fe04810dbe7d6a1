"""Activation registry: turn a name (or a module) into a fresh activation module.

Every block asks this factory for its own activation instance when it is built, so choosing
ReLU for one model never changes the activation of the next model built in the same process.

Example:
    >>> make_activation("relu6")
    ReLU6(inplace=True)
    >>> make_activation("nn.SiLU()")
    SiLU(inplace=True)
"""
from __future__ import annotations

import ast
import re
from typing import Callable, Union

from torch import nn

__all__ = ["ACTIVATION_NAMES", "ActivationSpec", "activation_name", "make_activation"]

# Slope used by YOLO-family LeakyReLU variants when the spelling gives none.
_LEAKY_SLOPE = 0.1

# name -> factory(arg) where arg is an optional numeric parameter from e.g. "nn.LeakyReLU(0.2)".
_FACTORIES: dict[str, Callable[[float | None], nn.Module]] = {
    "silu": lambda _: nn.SiLU(inplace=True),
    "relu": lambda _: nn.ReLU(inplace=True),
    "relu6": lambda _: nn.ReLU6(inplace=True),
    "leakyrelu": lambda a: nn.LeakyReLU(_LEAKY_SLOPE if a is None else a, inplace=True),
    "hardswish": lambda _: nn.Hardswish(inplace=True),
    "identity": lambda _: nn.Identity(),
}

# Module class -> registry name, used to name an existing activation module.
_CLASS_NAMES: dict[type, str] = {
    nn.SiLU: "silu",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leakyrelu",
    nn.Hardswish: "hardswish",
    nn.Identity: "identity",
}

ACTIVATION_NAMES: tuple[str, ...] = tuple(_FACTORIES)

ActivationSpec = Union[str, bool, None, nn.Module]

# Accepts "relu", "ReLU6", "nn.SiLU()", "torch.nn.LeakyReLU(0.1)", "leaky_relu".
_SPELLING = re.compile(r"^(?:torch\.)?(?:nn\.)?([A-Za-z0-9_]+)\s*(?:\((.*)\))?$")
_ALIASES = {"swish": "silu", "leaky_relu": "leakyrelu", "none": "identity", "linear": "identity"}


def _parse_spelling(spec: str) -> tuple[str, float | None]:
    """Split a spelling such as 'nn.LeakyReLU(0.2)' into ('leakyrelu', 0.2)."""
    match = _SPELLING.match(spec.strip())
    if not match:
        raise ValueError(f"activation {spec!r} is not understood; valid names: {', '.join(ACTIVATION_NAMES)}")
    name = match.group(1).lower()
    name = _ALIASES.get(name, name)
    if name not in _FACTORIES:
        raise ValueError(f"unknown activation {spec!r}; valid names: {', '.join(ACTIVATION_NAMES)}")
    raw_arg = (match.group(2) or "").strip()
    if raw_arg.startswith("inplace="):  # "nn.SiLU(inplace=True)": inplace is always set by us
        raw_arg = ""
    if not raw_arg:
        return name, None
    if name != "leakyrelu":
        raise ValueError(f"activation {spec!r}: only leakyrelu takes an argument (its negative slope)")
    try:
        value = ast.literal_eval(raw_arg.split(",")[0].strip())
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"activation {spec!r}: slope {raw_arg!r} is not a number") from err
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"activation {spec!r}: slope {raw_arg!r} is not a number")
    return name, float(value)


def make_activation(spec: ActivationSpec = None) -> nn.Module:
    """Return a new activation module for ``spec``.

    ``None`` or ``True`` give the default SiLU, ``False`` gives ``nn.Identity``, a string is looked
    up case-insensitively (``'relu'``, ``'ReLU6'``, ``'nn.SiLU()'``), and an ``nn.Module`` instance
    is returned as is. Activations are in-place, as upstream YOLOv5 initialises them.
    """
    if spec is None or spec is True:
        return _FACTORIES["silu"](None)
    if spec is False:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        name, arg = _parse_spelling(spec)
        return _FACTORIES[name](arg)
    raise ValueError(f"activation {spec!r} of type {type(spec).__name__} is not understood; "
                     f"valid names: {', '.join(ACTIVATION_NAMES)}")


def activation_name(spec: ActivationSpec) -> str:
    """Canonical spelling of an activation spec or module, e.g. ``nn.ReLU()`` -> ``'relu'``.

    The result rebuilds the same activation through :func:`make_activation`.
    """
    if isinstance(spec, nn.Module):
        name = _CLASS_NAMES.get(type(spec))
        if name == "leakyrelu" and spec.negative_slope != _LEAKY_SLOPE:
            return f"leakyrelu({spec.negative_slope})"  # keep a non-default slope in the spelling
        if name is not None:
            return name
        raise ValueError(f"activation module {type(spec).__name__} has no registry name; "
                         f"valid names: {', '.join(ACTIVATION_NAMES)}")
    return activation_name(make_activation(spec))


def is_activation(module: nn.Module) -> bool:
    """True for modules this registry can build (Identity excluded: it is 'no activation')."""
    return type(module) in _CLASS_NAMES and type(module) is not nn.Identity
