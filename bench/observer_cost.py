"""What the histogram observer's counting costs, and what counting fewer values would change.

Usage:
    python -m bench.observer_cost                       # torch.histc rows, 8x32x80x80
    python -m bench.observer_cost --subsample 2 4 8     # plus the exponents picked counting 1 in n images

Counting (torch.histc) is most of what an observed QAT step adds (notes/qat_speed.md). Two questions:

* the counting rows: histc and bincount side by side (quant.histogram times both once per process
  and counts with the faster); histc over [0, 2**top] on values after a ReLU, and on signed values (about half of
  them below the range, which histc skips), so whether a ReLU-folded quantizer could count relu(x)
  from x;
* ``--subsample``: PTQ calibration of yolov5n (ReLU) on coco128 images with the default recipe, once
  counting every value and once per n counting only every n-th image of each batch (min and max still
  from every value), and how many activation exponents come out the same.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mask_cost import timed  # noqa: E402
from bench.qat_speed import SHARED  # noqa: E402

BINS = 2 ** 15  # quant.histogram.HIST_BINS


def histc_rows(shape: tuple[int, ...] = (8, 32, 80, 80), runs: int = 30) -> dict[str, float]:
    """Median ms of counting one activation-sized tensor over [0, 8] into HIST_BINS bins, by counter
    (torch.histc, or the bincount quant.histogram uses where histc is slower) and by what its
    values are."""
    from quant.histogram import _add_bincount, _add_histc

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).reshape(-1)
    after_relu = x.clamp_min(0)
    hi = float(after_relu.max())
    row = torch.zeros(BINS, dtype=torch.float64)
    rows = {
        "histc, values after a ReLU": lambda: torch.histc(after_relu, BINS, 0.0, 8.0),
        "histc, signed values (half below the range)": lambda: torch.histc(x, BINS, 0.0, 8.0),
        "clamp_min(0), then histc": lambda: torch.histc(x.clamp_min(0), BINS, 0.0, 8.0),
        "clamp_min(0) alone": lambda: x.clamp_min(0),
        "histogram counter 'histc' (into a float64 row)": lambda: _add_histc(row, after_relu, 3, hi),
        "histogram counter 'bincount' (int16 indices)": lambda: _add_bincount(row, after_relu, 3, hi),
    }
    return timed(rows, runs)


@contextlib.contextmanager
def counting_every(n: int) -> Iterator[None]:
    """Within the block, histogram observers count only every n-th image of a 4-d batch (from the first);
    min and max, and so the histogram's range, still come from every value."""
    from quant import histogram as h

    shipped = h.ValueHistogram.add

    def add(self, x: torch.Tensor) -> Optional[tuple[float, float]]:
        values = h.finite_range(x)
        if values is None:
            return None
        counted = h.finite_range(x.detach()[::n]) if n > 1 and x.dim() == 4 and x.shape[0] >= n else None
        self.add_values(values if counted is None else (counted[0], values[1], values[2]), x.device)
        return values[1], values[2]

    h.ValueHistogram.add = add
    try:
        yield
    finally:
        h.ValueHistogram.add = shipped


def coco128_batches(images: int, imgsz: int, batch_size: int) -> list[torch.Tensor]:
    """The first ``images`` coco128 images as uint8 batches, letterboxed to ``imgsz``."""
    from utils.export.onnx_check import sample_batch

    files = sorted((SHARED / "datasets" / "coco128" / "images" / "train2017").glob("*.jpg"))[:images]
    if not files:
        raise FileNotFoundError(f"observer_cost: no coco128 images under {SHARED / 'datasets' / 'coco128'}")
    return [(sample_batch(files[i:i + batch_size], batch_size, (imgsz, imgsz)) * 255).round().to(torch.uint8)
            for i in range(0, len(files), batch_size)]


def activation_exponents(model: torch.nn.Module) -> dict[str, float]:
    """Exponent of every per-tensor (activation) quantizer, by name."""
    from quant.schedule import iter_quantizers

    return {name: float(q.exponent) for name, q in iter_quantizers(model) if not q.spec.per_channel}


def subsample_agreement(every: Sequence[int] = (2, 4, 8), weights: Path = SHARED / "weights" / "yolov5n.pt",
                        imgsz: int = 320, images: int = 64, batch_size: int = 8) -> list[dict]:
    """Per n: how many per-tensor (activation) exponents PTQ calibration picks the same when counting
    1 in n images as when counting all, and which differ (name, all, 1 in n)."""
    from quant.calibrate import calibrate
    from utils.qat import load_model, prepare_qat_model

    batches = coco128_batches(images, imgsz, batch_size)
    model, _ = load_model(Path(weights), act="relu")
    prepared = prepare_qat_model(model, imgsz)

    def exponents(n: int) -> dict[str, float]:
        m = copy.deepcopy(prepared)
        with counting_every(n):
            calibrate(m, batches, images)
        return activation_exponents(m)

    full = exponents(1)
    rows = []
    for n in every:
        got = exponents(int(n))
        differ = [(name, full[name], got[name]) for name in full if got[name] != full[name]]
        rows.append({"every": int(n), "same": len(full) - len(differ), "quantizers": len(full), "differ": differ})
        print(f"counting 1 in {n} images: {len(full) - len(differ)}/{len(full)} activation exponents as counting "
              f"all; differ: {differ}", flush=True)
    return rows


def run(shape: tuple[int, ...] = (8, 32, 80, 80), runs: int = 30, subsample: Sequence[int] = (),
        images: int = 64) -> dict:
    rows = histc_rows(shape, runs)
    for name, ms in rows.items():
        print(f"{name:<50}{ms:8.2f} ms", flush=True)
    from quant.histogram import histc_is_faster

    picked = "histc" if histc_is_faster() else "bincount"
    print(f"quant.histogram counts with {picked!r} on this machine", flush=True)
    result: dict = {"histc_ms": rows, "counter": picked}
    if subsample:
        result["subsample"] = subsample_agreement(subsample, images=images)
    return result


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", type=int, default=[8, 32, 80, 80], help="tensor counted by histc")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--subsample", nargs="*", type=int, default=[], help="n: count 1 in n images (PTQ calibration)")
    p.add_argument("--images", type=int, default=64, help="coco128 images calibrated on (with --subsample)")
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    run(tuple(o.shape), o.runs, o.subsample, o.images)
