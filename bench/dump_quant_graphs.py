"""Regenerate the QAT debug outputs kept in notes/: prepared-model structure, plan table and graphs.

Usage:
    python -m bench.dump_quant_graphs --cfg yolov5s.yaml --act relu --imgsz 64
        --graphs notes/graphs --notes notes/quant_prepared_yolov5s.txt

Builds the model from its yaml (random weights: the structure does not depend on them), runs
quant.prepare with the YOLO leaf/layer settings and writes <graphs>/<stem>_before_prepare.gv,
<graphs>/<stem>_after_prepare.gv and the text file with the plan table and print(model).
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
LOGGER = logging.getLogger("bench.dump_quant_graphs")
_LAYER = re.compile(r"model\.(\d+)(?:\.|$)")


def yolo_layer_index(name: str) -> Optional[int]:
    """'model.13.cv1' -> 13 (the yaml row); None outside model.<i>."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _trim(text: str, head: int, tail: int) -> str:
    lines = text.splitlines()
    if len(lines) <= head + tail:
        return text
    skipped = len(lines) - head - tail
    return "\n".join(lines[:head] + [f"... ({skipped} lines skipped) ..."] + lines[-tail:])


def run(cfg: str = "yolov5s.yaml", act: str = "relu", imgsz: int = 64, graphs: str = "notes/graphs",
        notes: str = "notes/quant_prepared_yolov5s.txt", quant_cfg: str = "data/quant/default.yaml", head: int = 400,
        tail: int = 60) -> dict:
    """Prepare ``cfg`` and write the graphs and the notes file; returns their paths."""
    import torch
    from torch import nn

    from models.yolo import DetectionModel
    from quant.config import QuantConfig
    from quant.prepare import prepare

    if quant_cfg and not Path(quant_cfg).is_file() and (ROOT / quant_cfg).is_file():
        quant_cfg = str(ROOT / quant_cfg)  # the repo-relative default works from any directory
    config = QuantConfig.from_yaml(quant_cfg) if quant_cfg else QuantConfig(leaf_modules=("Detect",))
    if "Detect" not in config.leaf_modules:  # YOLO's head decodes with shape-dependent code fx cannot trace
        config = QuantConfig.from_dict({**config.to_dict(), "leaf_modules": [*config.leaf_modules, "Detect"]})
    torch.manual_seed(0)
    model = DetectionModel(cfg, act=act)
    stem = Path(cfg).stem
    graph_dir = Path(graphs)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(model, torch.zeros(1, 3, imgsz, imgsz), config, yolo_layer_index, graph_dir=tmp)
        graph_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted(Path(tmp).iterdir()):
            dst = graph_dir / f"{stem}_{src.name}"
            shutil.copyfile(src, dst)
            written.append(dst)
    structure = nn.Module.__repr__(prepared)  # the module tree, without the generated code
    n_quant = len({id(m) for m in prepared.modules() if type(m).__name__ == "Pow2FakeQuantize"})
    source = Path(quant_cfg).relative_to(ROOT) if quant_cfg and Path(quant_cfg).is_relative_to(ROOT) else quant_cfg
    text = "\n".join([
        f"# {stem} (act={act}) prepared for QAT by quant.prepare; regenerate with",
        f"#   python -m bench.dump_quant_graphs --cfg {cfg} --act {act} --imgsz {imgsz} --quant-cfg '{source}'",
        f"# {len(prepared.plan)} plan rows, {n_quant} distinct quantizers; "
        f"graphs: {', '.join(p.name for p in written)}",
        "", "## Plan", prepared.plan.table(), "", "## print(model) (module tree, trimmed)",
        _trim(structure, head, tail), ""])
    notes_path = Path(notes)
    notes_path.parent.mkdir(parents=True, exist_ok=True)
    notes_path.write_text(text, encoding="utf-8")
    LOGGER.info("wrote %s and %s", notes_path, ", ".join(map(str, written)))
    return {"notes": str(notes_path), "graphs": [str(p) for p in written]}


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5s.yaml", help="model yaml (bare names resolve in models/)")
    parser.add_argument("--act", default="relu", help="activation the model is built with")
    parser.add_argument("--imgsz", type=int, default=64, help="example input size for tracing checks")
    parser.add_argument("--graphs", default=str(ROOT / "notes" / "graphs"), help="folder for the .gv files")
    parser.add_argument("--notes", default=str(ROOT / "notes" / "quant_prepared_yolov5s.txt"), help="text output")
    parser.add_argument("--quant-cfg", default="data/quant/default.yaml", help="quantization config yaml ('' for "
                        "the built-in defaults with Detect as a leaf)")
    return parser.parse_args(argv)


def main(opt: argparse.Namespace) -> dict:
    return run(opt.cfg, opt.act, opt.imgsz, opt.graphs, opt.notes, opt.quant_cfg)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_opt())
