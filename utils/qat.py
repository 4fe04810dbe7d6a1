"""YOLO glue for quant/: which config, which layer index a module belongs to, and QAT checkpoints.

quant/ knows nothing of YOLO; this module supplies the YOLO-specific pieces: the Detect head is a
leaf for torch.fx, `model.<i>.…` names map to layer index i for `layer:<i>` rules, and a QAT
checkpoint stores the float model's yaml, the prepared model's state and the quant config, so
`rebuild_qat_model` can call `prepare` again and load the state (checkpoints stay plain data).
`load_model` is the one place that tells a float checkpoint from a QAT one.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from copy import deepcopy
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from models.yolo import DetectionModel
from utils.checkpoint import FORMAT, CheckpointRecord, build_float_model, read_checkpoint
from utils.paths import ROOT

LOGGER = logging.getLogger(__name__)

DEFAULT_QAT_CONFIG = ROOT / "data" / "quant" / "default.yaml"
QAT_ENTRY_VERSION = 1
_LAYER = re.compile(r"^model\.(\d+)(?:\.|$)")


def yolo_layer_index(name: str) -> Optional[int]:
    """'model.24.m.0' -> 24; names outside the layer list -> None."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def load_quant_config(config: Union[str, Path, dict, Any, None]):
    """A QuantConfig from a yaml path, a dict, an existing config, or None (the shipped default)."""
    from quant.config import QuantConfig

    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, dict):
        return QuantConfig.from_dict(config, source="checkpoint")
    path = _config_path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: QAT config not found")
    if _is_default_config(path):
        return QuantConfig.from_yaml(path)
    # a user's file layers on the shipped recipe: one holding only `rules:` keeps the measured defaults
    base = QuantConfig.from_yaml(DEFAULT_QAT_CONFIG).to_dict()
    return QuantConfig.from_yaml(path, base=base)


def _config_path(config: Union[str, Path, None]) -> Path:
    """The config file a --qat-config value names (relative to the repo if not found as given)."""
    path = Path(config) if config else DEFAULT_QAT_CONFIG
    return ROOT / path if not path.is_file() and (ROOT / path).is_file() else path


def _is_default_config(config: Union[str, Path, None]) -> bool:
    return _config_path(config).resolve() == DEFAULT_QAT_CONFIG.resolve()


def prepare_qat_model(model: nn.Module, imgsz: int, config=None, graph_dir: Optional[Path] = None) -> nn.Module:
    """Fuse and insert power-of-2 fake quantizers into a float DetectionModel (returns a new
    :class:`quant.prepare.PreparedModel`, traced at ``imgsz``)."""
    from quant.prepare import check_rules_match, prepare

    user_file = isinstance(config, (str, Path)) and bool(str(config)) and not _is_default_config(config)
    config = load_quant_config(config)
    if user_file:  # a rule of the user's own file that matches nothing is a typo: say so before any work
        check_rules_match(config, model, yolo_layer_index)
    if "Detect" not in config.leaf_modules:  # tracing into the head would split its three outputs
        config = dataclasses.replace(config, leaf_modules=(*config.leaf_modules, "Detect"))
    silu = sum(isinstance(m, nn.SiLU) for m in model.modules())
    if silu:
        LOGGER.warning(f"WARNING: the model still has {silu} SiLU activations; they stay float after "
                       "prepare. Convert first (train.py --act relu) for an integer-only network.")
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, imgsz, imgsz, device=device)
    return prepare(model, example, config, layer_index_of=yolo_layer_index, graph_dir=graph_dir)


def is_prepared(model: Any) -> bool:
    """True for a fake-quantized model (what prepare returned, or its EMA copy)."""
    from quant.prepare import PreparedModel

    return isinstance(model, PreparedModel)


def qat_checkpoint_entry(prepared: nn.Module) -> dict:
    """The plain-data 'quant' entry of a QAT checkpoint."""
    return {"version": QAT_ENTRY_VERSION, "config": prepared.quant_config.to_dict(),
            "imgsz": int(prepared.example_shape[-1])}


def rebuild_qat_model(record: CheckpointRecord, state: Optional[dict] = None, device: Any = "cpu") -> nn.Module:
    """Prepare a fresh model exactly as training did and load the checkpoint's QAT state into it
    (``state`` defaults to the record's evaluation weights)."""
    path, entry = record.path, record.quant
    if entry.get("version") != QAT_ENTRY_VERSION:
        raise ValueError(f"{path}: QAT entry version {entry.get('version')} is not supported "
                         f"(expected {QAT_ENTRY_VERSION})")
    model = DetectionModel(deepcopy(record.yaml))
    prepared = prepare_qat_model(model, int(entry["imgsz"]), entry["config"])
    state = record.state if state is None else state
    missing, unexpected = prepared.load_state_dict(
        {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: QAT state does not match the rebuilt model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    prepared.names = dict(record.names)
    return prepared.to(device).eval()


def load_model(path: Union[str, Path], device: Any = "cpu", act: Any = None,
               fuse: bool = False) -> tuple[nn.Module, dict]:
    """A model from a checkpoint of either format, float or QAT; returns (model, meta).

    Float checkpoints: :func:`utils.checkpoint.build_float_model` (``act``, ``fuse`` apply). QAT
    checkpoints are prepared again and get their state back; meta then has ``qat: True``.

    Example:
        >>> model, meta = load_model("runs/train/exp/weights/best.pt")
    """
    record = read_checkpoint(path)
    if record.quant is None:
        return build_float_model(record, device=device, act=act, fuse=fuse)
    model = rebuild_qat_model(record, device=device)
    meta = {"format": FORMAT, "epoch": record.epoch, "names": model.names, "nc": int(record.yaml["nc"]),
            "stride": list(record.stride), "source": str(record.path), "weights": record.weights, "qat": True}
    return model, meta
