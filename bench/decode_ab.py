"""Other ways to write the Detect head's box decode in the ONNX export, timed against the shipped one.

Usage:
    python -m bench.decode_ab --imgsz 640 320 --threads 2 --rounds 30

The shipped decode (models.yolo.Detect) takes each level's sigmoid, splits it into xy / wh / the rest,
does the box arithmetic and concatenates the three pieces back, then concatenates the levels. Both
variants here drop the per-level split and concatenation (about 1.3 ms of the INT8 file's 640 px profile):

* ``scatter``: sigmoid per level, concatenate the levels, decode the four box columns of the joined
  tensor, and write them back with one ScatterElements;
* ``concat_last``: the same, but the decoded columns and the untouched rest are joined by one Concat;
* ``codes_moved`` (INT8 file only, graph surgery on the shipped one): the head output's 8-bit codes as
  uint8 with zero point 128 (the same values as int8 with zero point 0) and the head's Slice, Transpose,
  Reshape and Transpose moved before its DequantizeLinear, so they move bytes instead of floats.
  (With int8 codes the same move makes onnxruntime run the head convs in float: its Conv selector wants
  the same 8-bit type in and out, the head reads uint8 and writes int8, and only an int8
  QuantizeLinear -> DequantizeLinear pair with nothing between gets turned into uint8 for it.)

For each size the FP32 and INT8 files of every variant (bench.int8_latency.build_pair) run side by side
in one process, and each variant's outputs are compared with the shipped decode's.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.qat_speed import SHARED  # noqa: E402

VARIANTS = ("shipped", "scatter", "concat_last")  # exported decodes; codes_moved rewrites the shipped INT8 file
MOVABLE = ("Slice", "Transpose", "Reshape", "Transpose")  # the head's ops between its codes and the sigmoid
HEAD_SLICE_SUFFIX = "Conv_keep_channels"  # quant.qdq_onnx's Slice after a padded head conv


def codes_moved(model):
    """A copy of the INT8 ``model`` whose head outputs are uint8 codes with zero point 128 and whose
    Slice/Transpose/Reshape/Transpose chain runs on those codes, before the DequantizeLinear."""
    import onnx

    from quant.qdq_onnx import _Graph

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out)
    zero_point = g.add_init(np.array(128, np.uint8), "head_codes_zero_point")
    moved = 0
    for head_slice in [n for n in g.graph.node if n.op_type == "Slice" and n.name.endswith(HEAD_SLICE_SUFFIX)]:
        dq = g.producer[head_slice.input[0]]
        q = g.producer[dq.input[0]]
        for node in (q, dq):
            node.input.extend([""] * (3 - len(node.input)))
            node.input[2] = zero_point
        chain, last = [], dq
        for op in MOVABLE:
            following = g.users(last.output[0])
            if len(following) != 1 or following[0].op_type != op:
                break
            last = following[0]
            chain.append(last)
        if not chain:
            continue
        end = chain[-1].output[0]
        chain[0].input[0] = q.output[0]
        chain[-1].output[0] = f"{end}_codes"
        after = onnx.NodeProto()
        after.CopyFrom(dq)
        after.input[0], after.output[0] = f"{end}_codes", end
        g.graph.node.remove(dq)  # the DequantizeLinear now follows the ops it used to precede
        g.graph.node.insert(list(g.graph.node).index(chain[-1]) + 1, after)
        moved += 1
    if not moved:
        raise ValueError("decode_ab: no padded head conv (Slice '*Conv_keep_channels') in the INT8 file")
    return out


def joined_decode(detect, maps: list[torch.Tensor], variant: str, image: torch.Tensor | None = None) -> torch.Tensor:
    """(bs, N, no) boxes from the (bs, na, ny, nx, no) head maps, decoded after joining the levels (grid sizes
    from ``image``'s shape when given, as Detect.forward takes them in an export)."""
    bs = maps[0].shape[0]
    sig, offsets, gains, sizes = [], [], [], []
    for i, m in enumerate(maps):
        ny, nx = m.shape[2:4]
        if image is not None:
            ny, nx = image.shape[2] // int(detect.stride[i]), image.shape[3] // int(detect.stride[i])
        grid, anchor_grid = detect._make_grid(nx, ny, i, m)
        stride = detect.stride[i].to(m.dtype)
        sig.append(m.sigmoid().reshape(bs, -1, detect.no))
        offsets.append((grid * stride).reshape(1, -1, 2))  # (cell - 0.5) * stride
        gains.append((grid * 0 + 2 * stride).reshape(1, -1, 2))  # 2 * stride per row
        sizes.append((anchor_grid * 4).reshape(1, -1, 2))  # (2 s)^2 * anchor = s^2 * 4 anchor
    y = torch.cat(sig, 1)
    xy = y[..., 0:2] * torch.cat(gains, 1) + torch.cat(offsets, 1)
    wh = y[..., 2:4] ** 2 * torch.cat(sizes, 1)
    if variant == "scatter":
        index = torch.arange(4, device=y.device).view(1, 1, 4).expand(y.shape[0], y.shape[1], 4)
        return y.scatter(2, index, torch.cat((xy, wh), 2))
    return torch.cat((xy, wh, y[..., 4:]), 2)


@contextlib.contextmanager
def export_decode(variant: str) -> Iterator[None]:
    """Within the block, ONNX exports of Detect decode with ``variant`` (eager forwards are untouched)."""
    from models.yolo import Detect

    shipped = Detect.forward

    def forward(self, x, image=None):
        if variant == "shipped" or self.export_raw or not torch.onnx.is_in_onnx_export():
            return shipped(self, x, image)
        raw_before = self.export_raw
        self.export_raw = True  # the shipped forward up to the channels-last head maps
        try:
            maps = shipped(self, x, image)
        finally:
            self.export_raw = raw_before
        return joined_decode(self, maps, variant, image), maps

    Detect.forward = forward
    try:
        yield
    finally:
        Detect.forward = shipped


def run(weights: Path = SHARED / "weights" / "yolov5n.pt", imgsz: tuple[int, ...] = (640, 320), threads: int = 2,
        rounds: int = 30, block: int = 5, raw_head: bool = False) -> list[dict]:
    import onnx

    from bench.int8_latency import build_pair
    from bench.onnx_latency import side_by_side

    if raw_head:
        raise ValueError("decode_ab: --raw-head files have no decode to compare")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in imgsz:
            files = {}
            for variant in VARIANTS:
                folder = Path(tmp) / f"{variant}_{size}"
                folder.mkdir()
                with export_decode(variant):
                    files[f"fp32 {variant}"], files[f"int8 {variant}"] = build_pair(Path(weights), int(size), folder)
            moved = Path(tmp) / f"codes_moved_{size}.onnx"
            onnx.save(codes_moved(onnx.load(str(files["int8 shipped"]))), str(moved))
            files["int8 codes_moved"] = moved
            ms, outputs = side_by_side(files, int(size), threads, rounds, block)
            # codes_moved rewrites the INT8 file only: its FP32 file is the shipped one
            ms["fp32 codes_moved"], outputs["fp32 codes_moved"] = ms["fp32 shipped"], outputs["fp32 shipped"]
            for variant in (*VARIANTS, "codes_moved"):
                diff = max(float(np.abs(outputs[f"{kind} {variant}"][0] - outputs[f"{kind} shipped"][0]).max())
                           for kind in ("fp32", "int8"))
                row = {"imgsz": int(size), "variant": variant, "fp32_ms": ms[f"fp32 {variant}"],
                       "int8_ms": ms[f"int8 {variant}"], "max_diff_vs_shipped": diff}
                row["int8_over_fp32"] = row["int8_ms"] / row["fp32_ms"]
                rows.append(row)
                print(f"{size} px {variant:<12} FP32 {row['fp32_ms']:6.2f} ms  INT8 {row['int8_ms']:6.2f} ms  "
                      f"INT8/FP32 {row['int8_over_fp32']:.3f}  max |diff| vs shipped {diff:.3g}", flush=True)
    return rows


if __name__ == "__main__":
    from bench.onnx_latency import run_ab_cli

    try:
        run_ab_cli(run, __doc__)
    except ValueError as err:  # (--raw-head, or a file without the padded head)
        sys.exit(str(err))
