"""What the QDQ export's kernel-layout rewrites buy in onnxruntime: the INT8 file as export.py --plain-qdq
writes it, with the head convs padded to 16-channel multiples, with the space-to-depth stem, and with
both (what export.py writes by default), timed side by side with the FP32 file, outputs compared.

Usage:
    python -m bench.int8_layout --imgsz 320 640 --threads 2 --rounds 40
    python -m bench.int8_layout --raw-head          # both files with the raw head maps as outputs
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import SHARED  # noqa: E402

PLAIN = "int8 --plain-qdq"
DEFAULT = "int8, both (the default export)"


def layout_variants(plain: Path, folder: Path) -> dict[str, Path]:
    """The plain QDQ file and its rewritten copies, by name."""
    import onnx

    from quant.qdq_onnx import _drop_unused_initializers, _Graph, _pad_output_channels, _space_to_depth_stem

    files = {PLAIN: plain}
    for name, passes in (("int8, head padded", [_pad_output_channels]), ("int8, space-to-depth stem", [_space_to_depth_stem]),
                         (DEFAULT, [_pad_output_channels, _space_to_depth_stem])):
        model = onnx.load(str(plain))
        for rewrite in passes:
            if not rewrite(_Graph(model)):
                raise ValueError(f"{plain}: {rewrite.__name__} found nothing to rewrite")
        _drop_unused_initializers(_Graph(model))  # as quant.qdq_onnx.finalize_qdq_onnx ends
        files[name] = folder / f"{plain.stem}_{len(files)}.onnx"
        onnx.save(model, str(files[name]))
    return files


def run(weights: Path = SHARED / "weights" / "yolov5n.pt", imgsz: tuple[int, ...] = (320, 640), threads: int = 2,
        rounds: int = 40, block: int = 5, raw_head: bool = False) -> list[dict]:
    from bench.int8_latency import build_pair
    from bench.onnx_latency import side_by_side

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in imgsz:
            fp32, plain = build_pair(Path(weights), int(size), Path(tmp), plain_qdq=True, raw_head=raw_head)
            files = {"fp32": fp32, **layout_variants(plain, Path(tmp))}
            ms, outputs = side_by_side(files, int(size), threads, rounds, block)
            same = all(np.array_equal(a, b) for name in files if name.startswith("int8")
                       for a, b in zip(outputs[PLAIN], outputs[name]))
            rows.append({"imgsz": size, **ms, "identical_outputs": same})
            print(f"{size} px, {threads} threads (outputs of every INT8 file identical: {same})")
            for name, value in ms.items():
                print(f"  {name:36s} {value:7.2f} ms  INT8/FP32 {value / ms['fp32']:.3f}")
    return rows


if __name__ == "__main__":
    from bench.onnx_latency import run_ab_cli

    run_ab_cli(run, __doc__)
