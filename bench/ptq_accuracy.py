"""PTQ accuracy: the float model and its power-of-2 PTQ under several quantization recipes, side by side.

Usage:
    python -m bench.ptq_accuracy --weights runs/train/relu/weights/best.pt --data coco128.yaml --imgsz 320
    python -m bench.ptq_accuracy --weights best.pt --data coco128.yaml --variants default,w_ceil+a_hist_mse

Each variant is the shipped ``data/quant/default.yaml`` with a few keys changed (see VARIANTS; 'a+b'
applies a's changes then b's); it is
calibrated on ``--calib-images`` training images and scored by val.py's own ``run`` on the dataset's
val split. The table gives mAP50 and mAP50-95, the drop against the float model in points (x100),
and the seconds each quantization step took (calibration, bias correction) as the PTQ code logged them.
Score on images the model was not trained on when you can; on coco128 (train = val) the figures are
in-sample, and the table says which split was scored.
"""
from __future__ import annotations

import argparse
import copy
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

_HIST_MSE = {"observer": "histogram", "rounding": "mse"}
# name -> changes to data/quant/default.yaml: spec keys merge field by field, other keys replace.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # the first measured recipe (ceil weights, histogram-MSE activations) before bias correction and the
    # fixed head range were added: notes/ptq.md's first table is 'stage1+<variant>'
    "stage1": {"bias_correction": False, "rules": []},
    "before": {"weight": {"rounding": "round"}, "activation": {"observer": "ema_minmax", "rounding": "round"},
               "bias_correction": False, "rules": [{"pattern": "layer:24", "activation": {"rounding": "mse"}}]},
    "w_round": {"weight": {"rounding": "round"}},
    "w_ceil": {"weight": {"rounding": "ceil"}},
    "w_mse": {"weight": {"rounding": "mse"}},
    "a_ema_round": {"activation": {"observer": "ema_minmax", "rounding": "round"}},
    "a_minmax_ceil": {"activation": {"observer": "minmax", "rounding": "ceil"}},
    "a_minmax_mse": {"activation": {"observer": "minmax", "rounding": "mse"}},
    "a_hist_mse": {"activation": dict(_HIST_MSE)},
    "a_hist_p9999": {"activation": {"observer": "histogram", "rounding": "ceil", "percentile": 99.99}},
    "a_hist_p999": {"activation": {"observer": "histogram", "rounding": "ceil", "percentile": 99.9}},
    "bias_corr": {"bias_correction": True},
    "no_bias_corr": {"bias_correction": False},
    "learned_rounding": {"learned_rounding": True},
    # diagnostics: where the remaining error comes from
    "w16": {"weight": {"bits": 16}},
    "a16": {"activation": {"bits": 16}},
    "input_float": {"quantize_input": False},
    "head16": {"rules": [{"pattern": "layer:24", "weight": {"bits": 16}, "activation": {"bits": 16}}]},
    "head_out16": {"rules": [{"pattern": "layer:24", "activation": {"bits": 16}}]},
    "head_w16": {"rules": [{"pattern": "layer:24", "weight": {"bits": 16}}]},
    # the head's logits: fixed int8 ranges +-8 (step 1/16) and +-4 (step 1/32) instead of the searched one
    "head_k3": {"rules": [{"pattern": "layer:24", "activation": {"fixed_exponent": 3, "signed": True}}]},
    "head_k2": {"rules": [{"pattern": "layer:24", "activation": {"fixed_exponent": 2, "signed": True}}]},
}


def merge_config(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied: weight/activation/input mappings merge key by key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if key in ("weight", "activation", "input") and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


class _StepTimes(logging.Handler):
    """Collects the PTQ step timings that quant.ptq logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        summary = getattr(record, "ptq_summary", None)
        if summary is not None:
            self.records.append(summary)


def _score(weights: str, data: str, imgsz: int, batch_size: int, workers: int, **kwargs) -> tuple[float, float]:
    import val

    with tempfile.TemporaryDirectory() as project:
        (_, _, map50, map5095, *_), _, _ = val.run(data=data, weights=weights, imgsz=imgsz, batch_size=batch_size,
                                                workers=workers, plots=False, project=project, **kwargs)
    return float(map50), float(map5095)


def run_variants(weights: str, data: str, imgsz: int, variants: list[str], calib_images: int,
                 batch_size: int = 32, workers: int = 2, extra: dict[str, dict] | None = None) -> list[dict]:
    """Score the float model, then every variant; one dict per row."""
    table = {**VARIANTS, **(extra or {})}
    unknown = [part for v in variants for part in v.split("+") if part not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(table)}")
    base = yaml.safe_load((ROOT / "data" / "quant" / "default.yaml").read_text())
    timer = _StepTimes()
    logging.getLogger("quant.ptq").addHandler(timer)
    rows = []
    try:
        start = time.perf_counter()
        map50, map5095 = _score(weights, data, imgsz, batch_size, workers)
        rows.append({"variant": "float", "mAP50": map50, "mAP50-95": map5095, "seconds": time.perf_counter() - start})
        with tempfile.TemporaryDirectory() as tmp:
            for name in variants:
                cfg_path = Path(tmp) / f"{name.replace('+', '_')}.yaml"
                cfg = base
                for part in name.split("+"):  # 'a+b': a's changes, then b's
                    cfg = merge_config(cfg, table[part])
                cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
                timer.records.clear()
                start = time.perf_counter()
                map50, map5095 = _score(weights, data, imgsz, batch_size, workers, ptq=True,
                                        calib_images=calib_images, qat_config=str(cfg_path))
                steps = timer.records[-1] if timer.records else {}
                rows.append({"variant": name, "mAP50": map50, "mAP50-95": map5095,
                             "seconds": time.perf_counter() - start, **steps})
    finally:
        logging.getLogger("quant.ptq").removeHandler(timer)
    return rows


def format_table(rows: list[dict], scored_on: str) -> str:
    """Markdown table: variant, mAP50, mAP50-95, drop in points vs float, step times."""
    ref = rows[0]["mAP50-95"]
    lines = [f"scored on: {scored_on}", "",
             "| variant | mAP50 | mAP50-95 | drop (pt) | calibrate s | learned rounding s | bias corr. s | total s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = "-" if r["variant"] == "float" else f"{100 * (r['mAP50-95'] - ref):+.1f}"
        cal = f"{r['calibrate_s']:.1f}" if "calibrate_s" in r else "-"
        bias = f"{r['bias_correction_s']:.1f}" if r.get("bias_corrected") else "-"
        rounding = f"{r['learned_rounding_s']:.0f}" if r.get("learned_rounding_s") else "-"
        lines.append(f"| {r['variant']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {drop} | {cal} | {rounding} | "
                     f"{bias} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def scored_on(data_yaml: str) -> str:
    """What an accuracy table was scored on, saying so when the val split is the training split."""
    from utils.data.data_config import load_data_config

    data = load_data_config(data_yaml)
    same = data.get("val") == data.get("train")
    return f"{Path(data_yaml).name} '{data.get('val')}'" + (" (also the training images: in-sample)" if same else "")


def parse_opt(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="float checkpoint (ReLU model)")
    p.add_argument("--data", required=True, help="dataset yaml (calibration on train, scoring on val)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--calib-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from utils.log import setup_logging

    setup_logging()
    rows = run_variants(opt.weights, opt.data, opt.imgsz, [v for v in opt.variants.split(",") if v],
                        opt.calib_images, opt.batch_size, opt.workers)
    print(format_table(rows, scored_on(opt.data)))
    if opt.json:
        Path(opt.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
