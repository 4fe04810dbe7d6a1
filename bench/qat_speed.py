"""What QAT costs: float vs QAT training step time per QAT phase, eager and compiled, and INT8 vs FP32
inference latency of the exported models, as one table.

Usage:
    python -m bench.qat_speed --cfg yolov5n.yaml --act relu --imgsz 320 --batch-size 8
    python -m bench.qat_speed --no-compile --no-onnx --json qat_speed.json   # eager steps only

Every figure is measured side by side in this one process: the variants run in interleaved rounds
(the order turns by one each round) and each reports its median, so a busy machine slows them alike.

Training step, as utils.train.trainer takes it with accumulate 1 (forward, ComputeLoss, backward, gradient
clipping, SGD) on one random batch, for the phases of a QAT run (quant.schedule):
- float;
- QAT, observers on: epoch 0 of the default schedule (BN batch statistics);
- QAT, observers frozen, BN batch statistics: until --qat-freeze-bn-epoch;
- QAT, observers and BN frozen: the rest of the run;
- the same on the full prepared graph: what the trainer ran before quant.frozen_view.
Each QAT phase runs the forward the trainer runs in it. ``--compile`` (default on) adds every step under
torch.compile (the first steps of each phase compile, untimed); ``train.py --compile`` runs the observing
steps eager instead (histogram observers break the graph), so the compiled observer-window row uses the
eager observing step.

Inference: ``--onnx-weights`` rebuilt with ReLU and its calibrated QAT twin, exported as FP32 and INT8
QDQ ONNX (bench.int8_latency.build_pair), timed in onnxruntime on the CPU in interleaved blocks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("YQ_SHARED", ROOT.parent / "shared"))
LOGGER = logging.getLogger("bench.qat_speed")

NC = 80  # classes of the random training batch (COCO's, as the model yamls)
ONNX_SETTLE_S = 0.05  # default pause before each onnxruntime block (--onnx-settle)
PHASES = {  # name -> (label, observers on, BN frozen, forward: 'view' (what the trainer runs) or 'full')
    "qat_observe": ("QAT, observers on (BN batch statistics)", True, False, "view"),
    "qat_frozen_observers": ("QAT, observers frozen, BN batch statistics", False, False, "view"),
    "qat_frozen": ("QAT, observers and BN frozen", False, True, "view"),
    "qat_frozen_full_graph": ("  the same on the full prepared graph", False, True, "full"),
}


@dataclass
class Variant:
    """One timed step: ``setup`` puts the model in its phase, ``step`` runs one training step."""

    name: str
    label: str
    step: Callable[[], Any]
    setup: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times) if self.times else float("nan")


def interleave(variants: list[Variant], rounds: int, steps: int, sync: Callable[[], None] = lambda: None,
               settle: float = 0.0) -> None:
    """``rounds`` rounds of ``steps`` timed steps per variant; round r starts at variant r (mod n), so
    no variant always runs first or after the same neighbour. ``settle``: seconds of pause before each
    block, so the previous variant's spinning worker threads (onnxruntime's) have gone idle."""
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            if settle:
                time.sleep(settle)
            v.setup()
            for _ in range(steps):
                sync()
                t0 = time.perf_counter()
                v.step()
                sync()
                v.times.append(time.perf_counter() - t0)


def _train_variants(opt: dict, device: torch.device) -> tuple[list[Variant], list[Variant]]:
    """(eager variants, compiled variants): the float model, and its QAT twin in every phase."""
    from bench.train_speed import TrainStep, _autocast, build_float_model, load_hyp, random_batch
    from quant.frozen_view import frozen_view
    from quant.schedule import set_bn_frozen, set_observers
    from utils.qat import prepare_qat_model

    hyp, size, bs = load_hyp(opt["hyp"]), opt["imgsz"], opt["batch_size"]
    imgs, targets = random_batch(bs, size, NC, device, opt["seed"])
    model = build_float_model(opt["cfg"], NC, opt["act"], device, opt["seed"])
    float_step = TrainStep(model, hyp, size, bs, device, _autocast(device, qat=False)[0])
    prepared = prepare_qat_model(build_float_model(opt["cfg"], NC, opt["act"], device, opt["seed"]), size,
                                 opt["qat_config"]).train()
    qat_step = TrainStep(prepared, hyp, size, bs, device, _autocast(device, qat=True)[0])
    forwards = {"full": prepared, "view": frozen_view(prepared)}
    set_observers(prepared, True)
    for _ in range(opt["warmup"]):  # the ranges calibrate before any frozen phase
        qat_step(imgs, targets)
        float_step(imgs, targets)

    def uses(step: TrainStep, forward: Callable) -> Callable[[], None]:
        return lambda: setattr(step, "forward", forward)

    def phase(observers: bool, bn_frozen: bool, forward: str, using: dict = forwards) -> Callable[[], None]:
        return lambda: (set_observers(prepared, observers), set_bn_frozen(prepared, bn_frozen),
                        setattr(qat_step, "forward", using[forward]))

    def run_step(step: TrainStep) -> Callable[[], Any]:
        return lambda: step(imgs, targets)

    eager = [Variant("float", "float", run_step(float_step), uses(float_step, model))]
    eager += [Variant(name, label, run_step(qat_step), phase(*flags)) for name, (label, *flags) in PHASES.items()]
    compiled = []
    if opt["compile"]:
        compiled.append(Variant("float", "float", run_step(float_step), uses(float_step, torch.compile(model))))
        compiled_forwards = {name: torch.compile(module) for name, module in forwards.items()}
        compiled += [Variant(name, label, run_step(qat_step), phase(*flags, using=compiled_forwards))
                     for name, (label, *flags) in PHASES.items()]
        for variant in compiled:
            variant.setup()
            step = float_step if variant.name == "float" else qat_step
            for _ in range(max(opt["warmup"], 2)):  # the first forwards and backwards compile (untimed)
                step(imgs, targets)
    return eager, compiled


def _onnx_rows(opt: dict) -> list[dict]:
    """FP32 vs INT8 QDQ onnxruntime latency per size, both sessions timed in interleaved blocks."""
    from bench.int8_latency import build_pair
    from bench.onnx_latency import side_by_side

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in opt["onnx_imgsz"]:
            fp32_file, int8_file = build_pair(Path(opt["onnx_weights"]), int(size), Path(tmp), opt["act"] or "relu")
            ms, _ = side_by_side({"fp32": fp32_file, "int8": int8_file}, int(size), opt["onnx_threads"], opt["rounds"],
                                 opt["onnx_block"], settle=opt["onnx_settle"], spin=opt["onnx_spin"])
            rows.append({"imgsz": int(size), "fp32_median_ms": ms["fp32"], "int8_median_ms": ms["int8"],
                         "int8_over_fp32": ms["int8"] / ms["fp32"], "runs": opt["rounds"] * opt["onnx_block"],
                         "threads": opt["onnx_threads"]})
    return rows


def _rows(eager: list[Variant], compiled: list[Variant], observer_every: int = 1) -> dict[str, dict]:
    """Median ms and ratio to float per variant, eager and compiled. With ``observer_every`` N > 1, one more
    row: the mean step of the observer window when one batch in N is observed, (observing + (N - 1) x
    frozen observers with BN batch statistics) / N, from the two measured rows."""
    comp = {v.name: v for v in compiled}
    columns = {"eager": {v.name: v.median_ms for v in eager}}
    if "float" in comp:
        columns["compiled"] = {name: v.median_ms for name, v in comp.items()}
    labels = {v.name: v.label for v in eager}
    if observer_every > 1:
        labels["qat_observer_window"] = f"QAT, observer window, 1 in {observer_every} observed"
        # train.py --compile runs the observed batches eager (utils.train.forward: histogram observers)
        observed = columns["eager"]["qat_observe"]
        for ms in columns.values():
            ms["qat_observer_window"] = (observed + (observer_every - 1) * ms["qat_frozen_observers"]) / observer_every
    steps = {v.name: len(v.times) for v in eager}
    rows = {}
    for name, label in labels.items():
        eager_ms = columns["eager"][name]
        row = {"label": label, "steps": steps.get(name, 0), "eager_ms": eager_ms,
               "eager_over_float": eager_ms / columns["eager"]["float"]}
        if "compiled" in columns:
            row["compiled_ms"] = columns["compiled"][name]
            row["compiled_over_float"] = row["compiled_ms"] / columns["compiled"]["float"]
            row["compiled_over_eager"] = row["compiled_ms"] / eager_ms
        rows[name] = row
    return rows


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"qat_speed: {c['cfg']} act={c['act']} imgsz={c['imgsz']} batch={c['batch_size']} device={c['device']} "
             f"({c['device_name']}) torch {c['torch']}; {c['rounds']} interleaved rounds x {c['steps']} steps, "
             f"medians; histograms counted by {c.get('histogram_counter', '?')}",
             f"{'training step':<46}{'eager ms':>10}{'x float':>9}{'compiled ms':>13}{'x float':>9}{'x eager':>9}"]
    for row in result["steps"].values():
        line = f"{row['label']:<46}{row['eager_ms']:>10.1f}{row['eager_over_float']:>9.2f}"
        if "compiled_ms" in row:
            line += f"{row['compiled_ms']:>13.1f}{row['compiled_over_float']:>9.2f}{row['compiled_over_eager']:>9.2f}"
        lines.append(line)
    for row in result.get("onnx", []):
        lines.append(f"onnxruntime CPU, batch 1, {row['imgsz']} px: FP32 {row['fp32_median_ms']:.1f} ms, INT8 QDQ "
                     f"{row['int8_median_ms']:.1f} ms, INT8/FP32 x{row['int8_over_fp32']:.2f} ({row['runs']} runs each)")
    return "\n".join(lines)


def run(cfg: str = "yolov5n.yaml", act: Optional[str] = "relu", imgsz: int = 320, batch_size: int = 8,
        rounds: int = 7, steps: int = 2, warmup: int = 3, device: str = "cpu", threads: int = 0,
        compile: bool = True, onnx: bool = True, onnx_weights: str | Path = SHARED / "weights" / "yolov5n.pt",
        onnx_imgsz: tuple[int, ...] = (320,), onnx_threads: int = 0, onnx_block: int = 5,
        onnx_settle: float = ONNX_SETTLE_S, onnx_spin: bool = True,
        hyp: Optional[str | Path] = None, qat_config: Optional[str | Path] = None, seed: int = 0,
        json_out: Optional[str | Path] = None, observer_every: Optional[int] = None,
        histogram_counter: str = "auto") -> dict:
    """Measure, print the table, return (and with ``json_out`` save) the results. ``histogram_counter``
    'histc' or 'bincount' makes the histogram observers count that way instead of timing both ('auto',
    what training does: quant.histogram.histc_is_faster)."""
    import quant.histogram
    from bench.train_speed import DEFAULT_HYP, synchronize
    from utils.torch_utils import describe_device, keep_freed_memory, select_device
    from utils.train.config import TrainConfig

    if rounds < 1 or steps < 1:
        raise ValueError(f"qat_speed: --rounds and --steps must be >= 1, got {rounds} and {steps}")
    dev = select_device(device)
    keep_freed_memory(dev)  # as train.py does
    opt = dict(cfg=cfg, act=act, imgsz=imgsz, batch_size=batch_size, rounds=rounds, steps=steps, warmup=warmup,
               compile=compile, onnx_weights=onnx_weights, onnx_imgsz=tuple(onnx_imgsz), onnx_threads=onnx_threads,
               onnx_block=onnx_block, onnx_settle=onnx_settle, onnx_spin=onnx_spin, hyp=hyp or DEFAULT_HYP,
               qat_config=qat_config, seed=seed)
    if histogram_counter not in ("auto", "histc", "bincount"):
        raise ValueError(f"qat_speed: --histogram-counter {histogram_counter!r}: use auto, histc or bincount")
    picked = quant.histogram.histc_is_faster
    if histogram_counter != "auto":
        quant.histogram.histc_is_faster = lambda: histogram_counter == "histc"
    before = torch.get_num_threads()
    torch.set_num_threads(threads if threads > 0 else before)
    try:
        eager, compiled = _train_variants(opt, dev)
        interleave(eager + compiled, rounds, steps, lambda: synchronize(dev))
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in opt.items()}
        config.update(device=str(dev), device_name=describe_device(dev), torch=torch.__version__,
                      histogram_counter="histc" if quant.histogram.histc_is_faster() else "bincount")
    finally:
        torch.set_num_threads(before)
        quant.histogram.histc_is_faster = picked
    every = observer_every if observer_every is not None else TrainConfig.qat_observer_every
    result: dict[str, Any] = {"config": config, "steps": _rows(eager, compiled, every)}
    if onnx:
        result["onnx"] = _onnx_rows(opt)
    print(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", type=str, default="yolov5n.yaml", help="model yaml for the training steps")
    p.add_argument("--act", type=str, default="relu", help="activation of every conv block")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=320, help="training image size (pixels)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (QAT: observers calibrating)")
    p.add_argument("--device", type=str, default="cpu", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: its default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the onnxruntime latency rows")
    p.add_argument("--onnx-weights", type=str, default=str(SHARED / "weights" / "yolov5n.pt"))
    p.add_argument("--onnx-imgsz", nargs="+", type=int, default=[320], help="export and inference sizes")
    p.add_argument("--onnx-threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--onnx-block", type=int, default=5, help="onnxruntime runs per model and round")
    p.add_argument("--onnx-settle", type=float, default=ONNX_SETTLE_S,
                   help="seconds of pause before each onnxruntime block (spinning threads go idle)")
    p.add_argument("--onnx-no-spin", dest="onnx_spin", action="store_false",
                   help="onnxruntime worker threads do not spin between runs")
    p.add_argument("--hyp", type=str, default=None, help="hyperparameters (default hyp.scratch-low)")
    p.add_argument("--qat-config", type=str, default=None, help="QAT config yaml (default data/quant/default.yaml)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--observer-every", type=int, default=None,
                   help="also show the observer window's mean step with 1 batch in N observed (default: train.py's)")
    p.add_argument("--histogram-counter", default="auto", choices=["auto", "histc", "bincount"],
                   help="how histogram observers count (auto: the faster on this CPU, as training)")
    p.add_argument("--json", dest="json_out", type=str, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "qat_speed", errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
