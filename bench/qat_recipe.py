"""QAT recipe table: the float model, its PTQ, and QAT under several schedules, side by side.

Usage:
    python -m bench.qat_recipe --weights runs/train/relu/weights/best.pt --data coco128.yaml --imgsz 320 --epochs 5
    python -m bench.qat_recipe --weights best.pt --data coco128.yaml --variants default,no_ema --export

Each variant is an ordinary ``train.py --qat`` run (hyp.qat.yaml, data/quant/default.yaml) with a few
options or hyperparameters changed (see VARIANTS); its final mAP is what train.py validated after the
last epoch. ``--export`` also exports each QAT model to QDQ ONNX and scores it with val.py, to show the
exported model scores the same. Columns: mAP50, mAP50-95, drop against the float model in points, and
wall seconds per epoch (calibration and validation included).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOGGER = logging.getLogger(__name__)

# name -> {"opt": train.py keyword changes, "hyp": hyp.qat.yaml changes, "quant": a --qat-config overlay
# on data/quant/default.yaml}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # PTQ state first, observers keep calibrating through epoch 0, BN frozen from epoch 2, EMA on
    "frozen_ranges": {"opt": {"qat_observer_epochs": 0}},  # ranges stay as the PTQ calibration set them
    "no_calib": {"opt": {"qat_calib_images": 0}},  # no PTQ start: observers start from scratch in training
    "no_ema": {"hyp": {"ema_decay": 0.0}},
    "bn_frozen_0": {"opt": {"qat_freeze_bn_epoch": 0}},
    "bn_never_frozen": {"opt": {"qat_freeze_bn_epoch": -1}},
    "observe_all_epochs": {"opt": {"qat_observer_epochs": 1000}},  # observers never freeze (histograms grow)
    # observers count one batch in N of their window (the rest train at the frozen-observer cost)
    "observe_every_1": {"opt": {"qat_observer_every": 1}},
    "observe_every_2": {"opt": {"qat_observer_every": 2}},
    "observe_every_4": {"opt": {"qat_observer_every": 4}},
    "observe_every_8": {"opt": {"qat_observer_every": 8}},
    # trained power-of-2 thresholds (TQT): activations only, or weights too; hyp lr_threshold is Adam's step
    "tqt": {"quant": {"activation": {"trained_threshold": True}}},
    "tqt_all": {"quant": {"activation": {"trained_threshold": True}, "weight": {"trained_threshold": True}}},
    "lr_thr_0.05": {"hyp": {"lr_threshold": 0.05}},  # with tqt: 'tqt+lr_thr_0.05'
    "lr_thr_0.1": {"hyp": {"lr_threshold": 0.1}},
    "distill": {"opt": {"qat_distill": True}},  # the float --weights as teacher, hyp 'distill' gain
    "distill_0.1": {"opt": {"qat_distill": True}, "hyp": {"distill": 0.1}},
    # control: the same run without quantization (float training with hyp.qat.yaml for as many epochs);
    # QAT minus this row is what quantization costs when the float model is not converged
    "float_same_schedule": {"opt": {"qat": False, "noautoanchor": True}},
}


def _combined(name: str) -> dict[str, Any]:
    """'a+b': a's changes, then b's."""
    spec: dict[str, Any] = {"opt": {}, "hyp": {}, "quant": {}}
    for part in name.split("+"):
        for key in ("opt", "hyp"):
            spec[key].update(VARIANTS[part].get(key, {}))
        for section, fields in VARIANTS[part].get("quant", {}).items():
            spec["quant"].setdefault(section, {}).update(fields)
    return spec


def _val(weights: str | Path, data: str, imgsz: int, workers: int, **kwargs) -> tuple[float, float]:
    import val

    with tempfile.TemporaryDirectory() as project:
        (_, _, map50, map5095, *_), _, _ = val.run(data=data, weights=str(weights), imgsz=imgsz, batch_size=32,
                                                workers=workers, plots=False, project=project, **kwargs)
    return float(map50), float(map5095)


def _qat(name: str, spec: dict, weights: str, data: str, imgsz: int, epochs: int, batch_size: int, workers: int,
         project: Path) -> tuple[tuple[float, float], Path, float]:
    import train

    hyp = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.qat.yaml").read_text())
    hyp.update(spec.get("hyp", {}))
    hyp_path = project / f"{name}_hyp.yaml"
    hyp_path.write_text(yaml.safe_dump(hyp, sort_keys=False))
    kwargs = dict(weights=weights, data=data, imgsz=imgsz, epochs=epochs, batch_size=batch_size, workers=workers,
                  qat=True, hyp=str(hyp_path), project=str(project), name=name, exist_ok=True, noplots=True,
                  noval=True, device="cpu")
    kwargs.update(spec.get("opt", {}))
    if spec.get("quant"):
        overlay = project / f"{name}_quant.yaml"
        overlay.write_text(yaml.safe_dump(spec["quant"], sort_keys=False))
        kwargs["qat_config"] = str(overlay)
    start = time.perf_counter()
    results = train.run(**kwargs)
    seconds = time.perf_counter() - start
    return (float(results[2]), float(results[3])), project / name / "weights" / "best.pt", seconds / epochs


def run_recipes(weights: str, data: str, imgsz: int, epochs: int, variants: list[str], batch_size: int = 16,
                workers: int = 2, export: bool = False, project: Path | None = None) -> list[dict]:
    unknown = [part for v in variants for part in v.split("+") if part not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    project = Path(project or tempfile.mkdtemp(prefix="qat_recipe_"))
    project.mkdir(parents=True, exist_ok=True)
    rows = [{"variant": "float", **dict(zip(("mAP50", "mAP50-95"), _val(weights, data, imgsz, workers)))},
            {"variant": "PTQ (default config)",
             **dict(zip(("mAP50", "mAP50-95"), _val(weights, data, imgsz, workers, ptq=True, calib_images=512)))}]
    for name in variants:
        (map50, map5095), best, per_epoch = _qat(name.replace("+", "_"), _combined(name), weights, data, imgsz, epochs, batch_size,
                                                 workers, project)
        row = {"variant": f"QAT {name}", "mAP50": map50, "mAP50-95": map5095, "s_per_epoch": per_epoch}
        if export:
            import export as exporter

            onnx_path = exporter.run(weights=str(best), imgsz=[imgsz], include=("onnx",))
            row["onnx_mAP50-95"] = _val(onnx_path[0] if isinstance(onnx_path, (list, tuple)) else onnx_path,
                                        data, imgsz, workers)[1]
        rows.append(row)
        LOGGER.info(json.dumps(row))
    return rows


def format_table(rows: list[dict], epochs: int, scored_on: str) -> str:
    ref = rows[0]["mAP50-95"]
    lines = [f"scored on: {scored_on}; QAT {epochs} epochs", "",
             "| model | mAP50 | mAP50-95 | drop (pt) | QDQ ONNX mAP50-95 | s/epoch |", "|---|---|---|---|---|---|"]
    for r in rows:
        drop = "-" if r["variant"] == "float" else f"{100 * (r['mAP50-95'] - ref):+.1f}"
        onnx = f"{r['onnx_mAP50-95']:.3f}" if "onnx_mAP50-95" in r else "-"
        sec = f"{r['s_per_epoch']:.0f}" if "s_per_epoch" in r else "-"
        lines.append(f"| {r['variant']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {drop} | {onnx} | {sec} |")
    return "\n".join(lines)


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="float checkpoint (ReLU model)")
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variants", default="default,frozen_ranges,no_calib,no_ema",
                   help="comma-separated names from VARIANTS; 'a+b' combines them")
    p.add_argument("--export", action="store_true", help="also export each QAT model to QDQ ONNX and score it")
    p.add_argument("--project", default=None, help="where the QAT runs go (default: a temporary folder)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from bench.ptq_accuracy import scored_on
    from utils.log import setup_logging

    setup_logging()
    rows = run_recipes(opt.weights, opt.data, opt.imgsz, opt.epochs, [v for v in opt.variants.split(",") if v],
                       opt.batch_size, opt.workers, opt.export, opt.project)
    print(format_table(rows, opt.epochs, scored_on(opt.data)))
    if opt.json:
        Path(opt.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
