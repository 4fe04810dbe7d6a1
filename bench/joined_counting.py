"""Whether leaving the joined tensors out of the observed statistics moves any range.

Usage:
    python -m bench.joined_counting --weights relu_n20.pt                     # PTQ calibration only
    python -m bench.joined_counting --weights relu_n20.pt --data coco128.yaml --qat-epochs 3

Single-process training and PTQ calibration observe through quant.frozen_view, which drops the
re-quantization of a concat whose inputs share its quantizer, so the joined tensor (a second copy of
values the quantizer has just counted, rounded to its grid) is not counted. This runs both ways from the
same model and compares what comes out:

* PTQ: calibration on coco128 images (default recipe) through the full prepared graph and through the
  view; the activation exponents of each;
* ``--qat-epochs N``: two QAT runs (data/hyps/hyp.qat.yaml, every batch observed for N epochs), one with
  the full graph in every observed step and in its calibration; final exponents, weights and mAP.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.observer_cost import activation_exponents, coco128_batches  # noqa: E402


@contextlib.contextmanager
def full_graph_observing() -> Iterator[None]:
    """Calibration and observed training steps through the full prepared graph (the joined tensors counted)."""
    import quant.calibrate
    from utils.train.forward import TrainingForward

    observing_forward, pick = quant.calibrate._observing_forward, TrainingForward.pick

    def full_when_observing(self, observers_frozen: bool = False):
        return pick(self, observers_frozen) if observers_frozen else self.model

    quant.calibrate._observing_forward = lambda model: model
    TrainingForward.pick = full_when_observing
    try:
        yield
    finally:
        quant.calibrate._observing_forward, TrainingForward.pick = observing_forward, pick


def ptq_rows(weights: str, imgsz: int, images: int, batch_size: int) -> dict:
    from quant.calibrate import calibrate
    from utils.qat import load_model, prepare_qat_model

    batches = coco128_batches(images, imgsz, batch_size)
    model, _ = load_model(Path(weights), act="relu")
    prepared = prepare_qat_model(model, imgsz)
    view, full = copy.deepcopy(prepared), copy.deepcopy(prepared)
    calibrate(view, batches, images)
    with full_graph_observing():
        calibrate(full, batches, images)
    a, b = activation_exponents(full), activation_exponents(view)
    differ = [(name, a[name], b[name]) for name in a if a[name] != b[name]]
    print(f"PTQ, {images} coco128 images at {imgsz}: {len(a) - len(differ)}/{len(a)} activation exponents the "
          f"same with and without the joined tensors; differ (name, full graph, view): {differ}", flush=True)
    return {"quantizers": len(a), "same": len(a) - len(differ), "differ": differ}


def qat_rows(weights: str, data: str, imgsz: int, epochs: int, batch_size: int, project: str) -> dict:
    import train

    runs = {}
    for name in ("full_graph", "view"):
        with full_graph_observing() if name == "full_graph" else contextlib.nullcontext():
            results = train.run(weights=weights, data=data, qat=True, hyp=str(ROOT / "data" / "hyps" / "hyp.qat.yaml"),
                                epochs=epochs, imgsz=imgsz, batch_size=batch_size, workers=2, project=project,
                                name=name, qat_observer_epochs=epochs, qat_observer_every=1, noplots=True)
        state = torch.load(Path(project) / name / "weights" / "last.pt", map_location="cpu",
                           weights_only=False)["state_dict"]
        runs[name] = (float(results[2]), float(results[3]), state)
    (map50_a, map_a, a), (map50_b, map_b, b) = runs["full_graph"], runs["view"]
    exponents = [k for k in a if k.endswith(".exponent")]
    row = {"exponents": len(exponents), "exponents_differ": [k for k in exponents if not torch.equal(a[k], b[k])],
           "tensors": len(a), "tensors_differ": [k for k in a if not torch.equal(a[k], b[k])],
           "full_graph_map": (map50_a, map_a), "view_map": (map50_b, map_b)}
    print(f"QAT, {epochs} epochs, every batch observed: exponents differ {len(row['exponents_differ'])}/"
          f"{len(exponents)}; tensors differ {len(row['tensors_differ'])}/{len(a)}: {row['tensors_differ']}; "
          f"mAP50 / mAP50-95 full graph {map50_a:.4f} / {map_a:.4f}, view {map50_b:.4f} / {map_b:.4f}", flush=True)
    return row


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=str, required=True, help="a ReLU model (.pt)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--images", type=int, default=128, help="coco128 images PTQ calibrates on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", type=str, default="", help="dataset yaml for --qat-epochs")
    p.add_argument("--qat-epochs", type=int, default=0, help="also compare two QAT runs of this many epochs")
    p.add_argument("--project", type=str, default="", help="where the QAT runs go (default: a temporary folder)")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> dict:
    result = {"ptq": ptq_rows(opt.weights, opt.imgsz, opt.images, opt.batch_size)}
    if opt.qat_epochs:
        if not opt.data:
            raise SystemExit("joined_counting: --qat-epochs needs --data")
        with tempfile.TemporaryDirectory() as tmp:
            result["qat"] = qat_rows(opt.weights, opt.data, opt.imgsz, opt.qat_epochs, opt.batch_size,
                                     opt.project or tmp)
    return result


if __name__ == "__main__":
    main(parse_opt())
