"""Class names in the one shape the rest of the code uses: ``dict[int, str]``.

Dataset yamls, checkpoints (ours and upstream's) and ONNX metadata give names as a list or as a
mapping with int or str keys; every reader turns them into a dict through :func:`normalise_names`.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["normalise_names"]


def normalise_names(names: Any, source: str = "names") -> dict[int, str]:
    """``['a', 'b']`` or ``{'0': 'a', 1: 'b'}`` -> ``{0: 'a', 1: 'b'}``; None or empty -> ``{}``.

    Raises ValueError naming ``source`` for anything else (a string, a number, a non-integer key).
    """
    if not names:
        return {}
    if isinstance(names, (list, tuple)):
        return {i: str(v) for i, v in enumerate(names)}
    if isinstance(names, Mapping):
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{source}: class name keys must be integers, got {sorted(map(str, names))[:4]}") from None
    raise ValueError(f"{source}: class names must be a list or a mapping, got {type(names).__name__}")
