"""YOLO glue for PTQ sensitivity analysis: rank layers by how much quantizing each one alone costs, then
find the fewest layers to keep at 16 bits for a given mAP drop, and write that as a --qat-config yaml.

Used by ``val.py --ptq --ptq-sensitivity --target-drop 0.5``. Ranking compares the raw head maps of
the float model and the model with one layer quantized (a few calibration images, seconds); choosing N
scores PTQ with mAP50-95 on the dataset's val split (one PTQ + validation per bisection step).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch.nn as nn

from utils.log import colorstr

LOGGER = logging.getLogger(__name__)


def _val_map(model: nn.Module, loader, device, data: dict) -> float:
    from utils.eval.evaluate import EvalOptions, evaluate

    model.eval()
    result = evaluate(model, loader, device, int(data["nc"]), dict(data["names"]), EvalOptions())
    return float(result.map)


def _ptq(float_model: nn.Module, imgsz: int, config, data: dict, calib_images: int, device, workers: int) -> nn.Module:
    from utils.data.calibration import calibrate_on_training_images
    from utils.qat import prepare_qat_model

    prepared = prepare_qat_model(copy.deepcopy(float_model), imgsz, config)
    calibrate_on_training_images(prepared, data, imgsz, calib_images, device, workers)
    return prepared.eval()


def ranking_table(ranking: list[tuple[str, float]], wide: int) -> str:
    lines = [f"{'rank':>4}  {'layer':<22} {'head SQNR alone':>16}  kept at 16 bits"]
    for i, (name, db) in enumerate(ranking):
        lines.append(f"{i + 1:>4}  {name:<22} {db:>13.1f} dB  {'yes' if i < wide else ''}")
    return "\n".join(lines)


def sensitivity_config(float_model: nn.Module, data: dict, imgsz: int, calib_images: int, config: Any,
                       target_drop: float, val_loader, device, workers: int, save_dir: Path) -> Path:
    """Rank, choose N, write ``save_dir/mixed_precision.yaml``; returns its path. ``target_drop`` is in
    points of mAP50-95 (0.5 = 0.005) against the float model on ``val_loader``."""
    from quant.calibrate import iter_images
    from quant.sensitivity import fewest_wide_layers, mixed_precision_config, rank_layers
    from utils.qat import load_quant_config

    config = load_quant_config(config)
    float_map = _val_map(float_model, val_loader, device, data)
    base = _ptq(float_model, imgsz, config, data, calib_images, device, workers)
    images = next(iter_images(val_loader, 8, device))
    ranking = rank_layers(base, images, outputs=lambda out: out[1])  # raw head maps, not decoded boxes
    names = [name for name, _ in ranking]

    def score(wide: list[str]) -> float:
        return _val_map(_ptq(float_model, imgsz, mixed_precision_config(config, wide), data, calib_images,
                             device, workers), val_loader, device, data)

    def log(n: int, value: float) -> None:
        LOGGER.info(colorstr("sensitivity: ") + f"{n} layer(s) at 16 bits: mAP50-95 {value:.4f} "
                                                f"({100 * (value - float_map):+.2f} pt vs float {float_map:.4f})")

    n, value = fewest_wide_layers(names, score, float_map - target_drop / 100.0, log)
    LOGGER.info("\n" + ranking_table(ranking, n))
    if value < float_map - target_drop / 100.0:
        LOGGER.warning(f"WARNING: even with every layer at 16 bits the drop is {100 * (float_map - value):.2f} pt, "
                       f"above the target {target_drop} pt")
    out = Path(save_dir) / "mixed_precision.yaml"
    mixed_precision_config(config, names[:n]).to_yaml(out)
    LOGGER.info(colorstr("sensitivity: ") + f"{n} layer(s) kept at 16 bits for a drop <= {target_drop} pt: {out} "
                f"(use it as --qat-config)")
    return out
