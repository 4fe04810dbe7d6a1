"""Long-QAT stability: does power-of-2 INT8 QAT stay stable over many epochs?

Usage:
    python -m bench.qat_stability --float-epochs 30 --epochs 20 --imgsz 128 --out runs/qat_stability
    python -m bench.qat_stability --weights runs/train/relu/weights/best.pt --data coco128.yaml --epochs 100

Without ``--weights`` a float yolov5p (ReLU) model is first trained from scratch for
``--float-epochs`` on ``--data`` (default: the synthetic shapes set, generated under ``--out``);
QAT then starts from that run's best.pt for ``--epochs``. Both runs are ordinary train.py runs;
their results.csv files are read back and joined into one per-epoch table (``stability.csv``),
one plot (``stability.png``: loss and mAP, float phase then QAT phase) and a verdict
(``stability.json``): non-finite steps skipped, and whether mAP@0.5 collapsed (fell below
``--collapse-frac`` of the best QAT epoch's, or to ~0, at any later epoch).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOGGER = logging.getLogger(__name__)

LOSS_KEYS = ("train/box_loss", "train/obj_loss", "train/cls_loss")
MAP50, MAP = "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"


class _SkipCounter(logging.Handler):
    """Counts the trainer's 'step skipped' warnings (non-finite loss or gradients)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "step skipped" in record.getMessage():
            self.count += 1


def read_results(csv_path: str | Path, phase: str, offset: int = 0) -> list[dict[str, Any]]:
    """Rows of a train.py results.csv as dicts (keys stripped), tagged with ``phase`` and a global epoch."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(fh)]
    out = []
    for r in rows:
        epoch = int(float(r["epoch"]))
        loss = sum(float(r[k]) for k in LOSS_KEYS)
        out.append({"phase": phase, "epoch": epoch, "step": offset + epoch, "loss": loss,
                    "mAP50": float(r[MAP50]), "mAP": float(r[MAP])})
    return out


def collapse_check(rows: list[dict[str, Any]], frac: float = 0.5, floor: float = 0.01) -> list[str]:
    """Epochs of the QAT phase whose mAP@0.5 is non-finite, or below ``frac`` of the best so far.

    The best starts at the float model's last epoch, so a QAT start far below it counts too; a
    model that never reached ``floor`` can not collapse (nothing to lose).
    """
    bad = []
    floats = [r["mAP50"] for r in rows if r["phase"] == "float" and math.isfinite(r["mAP50"])]
    best = floats[-1] if floats else 0.0
    for r in (r for r in rows if r["phase"] == "qat"):
        m = r["mAP50"]
        if not math.isfinite(m) or not math.isfinite(r["loss"]):
            bad.append(f"epoch {r['epoch']}: non-finite loss or mAP")
        elif best > floor and m < frac * best:
            bad.append(f"epoch {r['epoch']}: mAP@0.5 {m:.3f} (best so far {best:.3f})")
        best = max(best, m if math.isfinite(m) else 0.0)
    return bad


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Loss and mAP against the global epoch, the float phase and the QAT phase in two colours."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(11, 4), tight_layout=True)
    for phase, colour in (("float", "tab:blue"), ("qat", "tab:red")):
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue
        x = [r["step"] for r in sel]
        ax_l.plot(x, [r["loss"] for r in sel], color=colour, marker=".", label=f"{phase} train loss")
        ax_m.plot(x, [r["mAP50"] for r in sel], color=colour, marker=".", label=f"{phase} mAP@0.5")
        ax_m.plot(x, [r["mAP"] for r in sel], color=colour, ls="--", label=f"{phase} mAP@0.5:0.95")
    ax_l.set(xlabel="epoch (float, then QAT)", ylabel="box+obj+cls loss", title="training loss")
    ax_m.set(xlabel="epoch (float, then QAT)", ylabel="mAP", title="validation mAP", ylim=(0, 1))
    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _train(**kw: Any) -> Path:
    """One in-process train.py run; returns its run folder."""
    import train

    train.run(**kw)
    return Path(kw["project"]) / kw["name"]


def run(epochs: int = 20, float_epochs: int = 30, imgsz: int = 128, weights: str = "", data: str = "",
        out: str = "runs/qat_stability", n_train: int = 256, n_val: int = 64, batch_size: int = 16,
        cfg: str = "yolov5p.yaml", workers: int = 0, device: str = "cpu", collapse_frac: float = 0.5,
        qat_config: str = "", qat_distill: bool = False) -> dict:
    """Float phase (unless ``weights``), then QAT for ``epochs``; writes csv, png and json under ``out``.
    ``qat_config``: a --qat-config file (e.g. trained thresholds); ``qat_distill``: distil from the float model."""
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not data:
        from utils.data.synthetic import make_synthetic_dataset

        data = str(make_synthetic_dataset(out_dir / "synthetic", n_train=n_train, n_val=n_val, img_size=imgsz))
    common = dict(data=data, imgsz=imgsz, batch_size=batch_size, workers=workers, device=device,
                  project=str(out_dir), exist_ok=True, noplots=True)
    counter = _SkipCounter()
    logging.getLogger().addHandler(counter)
    try:
        rows: list[dict[str, Any]] = []
        if not weights:
            run_dir = _train(cfg=cfg, weights="", act="relu", epochs=float_epochs, name="float", **common)
            rows += read_results(run_dir / "results.csv", "float")
            weights = str(run_dir / "weights" / "best.pt")
        qat_opts = dict(qat_config=qat_config) if qat_config else {}
        qat_dir = _train(weights=weights, qat=True, epochs=epochs, name="qat", qat_distill=qat_distill, **qat_opts,
                         **common)
        rows += read_results(qat_dir / "results.csv", "qat", offset=len(rows))
    finally:
        logging.getLogger().removeHandler(counter)
    with open(out_dir / "stability.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out_dir / "stability.png")
    verdict = {"weights": weights, "data": data, "imgsz": imgsz, "float_epochs": sum(r["phase"] == "float" for r in rows),
               "qat_epochs": epochs,
               "nonfinite_steps_skipped": counter.count, "collapse": collapse_check(rows, collapse_frac)}
    (out_dir / "stability.json").write_text(json.dumps(verdict, indent=2))
    return verdict


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark (``argv`` None reads sys.argv)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20, help="QAT epochs")
    p.add_argument("--float-epochs", type=int, default=30, help="float epochs before QAT (without --weights)")
    p.add_argument("--imgsz", type=int, default=128, help="train/val image size")
    p.add_argument("--weights", default="", help="float checkpoint to start QAT from (skips the float phase)")
    p.add_argument("--data", default="", help="dataset yaml (default: synthetic shapes under --out)")
    p.add_argument("--out", default="runs/qat_stability", help="output folder")
    p.add_argument("--n-train", type=int, default=256, help="synthetic train images")
    p.add_argument("--n-val", type=int, default=64, help="synthetic val images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cfg", default="yolov5p.yaml", help="model yaml of the float phase")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--qat-config", default="", help="QAT config yaml (default: data/quant/default.yaml)")
    p.add_argument("--qat-distill", action="store_true", help="QAT: distil from the float model")
    p.add_argument("--collapse-frac", type=float, default=0.5, help="mAP@0.5 below this x best = collapse")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    """Run the benchmark and print the verdict; exit 1 when QAT collapsed or skipped steps."""
    sys.path.insert(0, str(ROOT))
    from utils.log import setup_logging

    setup_logging()
    verdict = run(**vars(opt))
    print(json.dumps(verdict, indent=2))
    return 1 if verdict["collapse"] or verdict["nonfinite_steps_skipped"] else 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
