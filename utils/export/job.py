"""One export request end to end: checkpoint -> ONNX file beside it -> onnxruntime-vs-PyTorch check.

This is what ``export.py`` runs; it is callable from Python and raises library errors (ExportError,
CheckpointError, FileNotFoundError, ImportError) carrying the file and value in one line.

Example:
    >>> result = export_weights("yolov5n.pt", imgsz=320, dynamic=True)  # doctest: +SKIP
    >>> result.file, result.checks[0].passed  # doctest: +SKIP
    (PosixPath('yolov5n.onnx'), True)
"""
from __future__ import annotations

import logging
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from utils.export.onnx_backend import EXACT_INT8_CONFIG, import_optional, session_options
from utils.export.onnx_check import FLOAT_TOL, HALF_TOL, CheckResult, sample_batch, verify_onnx
from utils.export.onnx_export import (ExportError, OnnxOptions, build_metadata, check_include, export_onnx_float,
                               export_onnx_qdq, prepare_for_export)
from utils.names import normalise_names

__all__ = ["ExportResult", "QdqCheck", "QDQ_MIN_FRACTION", "export_weights", "normalise_imgsz", "names_from_data",
           "verify_qdq"]

LOGGER = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What an export wrote and how its check went."""

    file: Path
    metadata: dict[str, str]
    checks: list[Any] = field(default_factory=list)  # CheckResult (float) or QdqCheck (QAT)
    ranges_file: Path | None = None  # QAT exports: the .ranges.json beside the file


# A QDQ file passes its check when at least this fraction of all raw head values lies within one
# quantization step (the output quantizer's scale) of the PyTorch QAT model's: integer kernels
# may round a value near a rounding boundary the other way, which moves it by exactly one step.
QDQ_MIN_FRACTION = 0.999


@dataclass
class QdqCheck:
    """onnxruntime (raw head maps of the QDQ file) vs PyTorch on one input batch.

    The pass rule compares with the BN-folded export module (quant.export.convert_for_export: the
    network the file encodes); ``qat_within`` is the same measure against the prepared QAT model
    itself, whose simulated-BN eval path (conv / sf, then BN) adds float32 rounding that can flip
    values near a rounding boundary and propagate (reported, warned below QDQ_MIN_FRACTION).
    """

    shape: tuple
    fraction_within: float  # of all values, |onnx - torch| <= one step of that output's quantizer
    max_steps: float  # largest difference, in steps
    exact: float  # fraction of values that are identical
    qat_within: float = 1.0  # fraction within one step of the prepared (fake-quant) model's maps
    qat_exact: float = 1.0

    @property
    def passed(self) -> bool:
        return self.fraction_within >= QDQ_MIN_FRACTION

    def line(self) -> str:
        return (f"input {self.shape}: {100 * self.fraction_within:.3f}% of raw head values within one step "
                f"(need {100 * QDQ_MIN_FRACTION:.1f}%), {100 * self.exact:.2f}% identical, max diff "
                f"{self.max_steps:.2f} steps {'PASS' if self.passed else 'FAIL'}; vs the QAT model: "
                f"{100 * self.qat_within:.3f}% within one step, {100 * self.qat_exact:.2f}% identical")


def normalise_imgsz(imgsz: int | Sequence[int], stride: int) -> tuple[int, int]:
    """--imgsz as (height, width): one value means square. Each must be a positive multiple of ``stride``
    (unlike upstream, which silently rounds up: an exported size is a contract, so we refuse)."""
    sizes = [int(imgsz)] if isinstance(imgsz, (int, float)) else [int(x) for x in imgsz]
    if len(sizes) not in (1, 2):
        raise ExportError(f"--imgsz {sizes}: give one size (square) or two (height width)")
    h, w = sizes * 2 if len(sizes) == 1 else sizes
    bad = [x for x in (h, w) if x <= 0 or x % stride]
    if bad:
        raise ExportError(f"--imgsz {' '.join(map(str, sizes))}: {bad[0]} is not a positive multiple of the "
                          f"model's max stride {stride} (try {max(stride, -(-bad[0] // stride) * stride)})")
    return h, w


def names_from_data(data: str | Path, nc: int) -> dict[int, str]:
    """Class names from a dataset yaml (a list or an {index: name} mapping); must have ``nc`` entries."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset yaml not found (--data)")
    with open(path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    names = cfg.get("names") if isinstance(cfg, dict) else None
    if not isinstance(names, (list, tuple, dict)) or not names:
        raise ExportError(f"{path}: no 'names' list or mapping in the dataset yaml")
    names = normalise_names(names, str(path))
    if len(names) != nc:
        raise ExportError(f"{path}: has {len(names)} class names but the model has {nc} classes")
    return names


def _check_inputs(images: Sequence[Path] | None, batch: int, imgsz: tuple[int, int], dynamic: bool,
                  stride: int) -> list[torch.Tensor]:
    """The export shape, plus for dynamic files another batch size and width, to prove they are free."""
    inputs = [sample_batch(images, batch, imgsz)]
    if dynamic:
        h, w = imgsz
        inputs.append(sample_batch(images, batch + 1, (h, w - stride if w > stride else w + stride), seed=1))
    return inputs


def _verify(file: Path, model: torch.nn.Module, options: OnnxOptions, inputs: list[torch.Tensor]) -> list[CheckResult]:
    wrapper = prepare_for_export(model, options.raw_head)
    checks = verify_onnx(file, wrapper, inputs, HALF_TOL if options.half else FLOAT_TOL)
    for check in checks:
        LOGGER.info("ONNX check: onnxruntime vs PyTorch, %s", check.line())
    failed = [c for c in checks if not c.passed]
    if failed:
        worst = max(failed, key=lambda c: c.max_scaled)
        raise ExportError(f"{file}: onnxruntime disagrees with PyTorch at input {worst.shape}: max abs diff "
                          f"{worst.max_abs:.4g}, max scaled diff {worst.max_scaled:.4g} > tolerance {worst.tol:g}")
    return checks


def _raw_twin(file: Path, prepared: torch.nn.Module, im: torch.Tensor, options: OnnxOptions, tmp: Path,
              converted: torch.nn.Module) -> Path:
    """The raw-head file to compare: ``file`` itself, or a raw-head export of the same converted model in ``tmp``."""
    if options.raw_head:
        return file
    from dataclasses import replace

    twin = tmp / f"{file.stem}_raw.onnx"
    export_onnx_qdq(prepared, im, twin, replace(options, raw_head=True), converted=converted)
    return twin


def verify_qdq(file: Path, prepared: torch.nn.Module, inputs: list[torch.Tensor], options: OnnxOptions,
               converted: torch.nn.Module | None = None) -> list[QdqCheck]:
    """Compare the QDQ file's raw head maps in onnxruntime with PyTorch's (see QdqCheck for the rule).

    A decoded file is checked through a raw-head twin exported to a temporary folder (the decoded
    output mixes box pixels and sigmoid scores, whose errors are not in quantization steps); the
    decoded file itself must load and run. See QDQ_MIN_FRACTION for the rule. ``converted`` is the
    export's converted module (:class:`quant.export.QdqExport`); without it the model is converted here.
    """
    import tempfile

    from quant.export import convert_for_export
    from quant.qdq_onnx import output_steps

    converted = converted if converted is not None else convert_for_export(prepared).float()
    onnx = import_optional("onnx", "checking the exported ONNX model")
    ort = import_optional("onnxruntime", "checking the exported ONNX model")
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = _raw_twin(file, prepared, inputs[0], options, Path(tmp), converted)
        steps = output_steps(onnx.load(str(raw)))
        sessions = [ort.InferenceSession(str(f), session_options(ort), providers=["CPUExecutionProvider"])
                    for f in dict.fromkeys([raw, file])]
        folded = prepare_for_export(converted, raw_head=True)
        qat = prepare_for_export(prepared, raw_head=True)
        for x in inputs:
            feeds = {sessions[0].get_inputs()[0].name: x.float().numpy()}
            got = sessions[0].run(None, feeds)
            for session in sessions[1:]:
                session.run(None, feeds)  # the decoded file must run too
            within, worst, exact = _step_agreement(folded, x, got, steps)
            qat_within, _, qat_exact = _step_agreement(qat, x, got, steps)
            checks.append(QdqCheck(tuple(x.shape), within, worst, exact, qat_within, qat_exact))
    return checks


def _step_agreement(wrapper: torch.nn.Module, x: torch.Tensor, got: list, steps: list) -> tuple[float, float, float]:
    """(fraction within one step, max difference in steps, fraction identical) of ``got`` vs ``wrapper(x)``."""
    import numpy as np

    with torch.no_grad():
        ref = [t.float().numpy() for t in wrapper(x.float())]
    within = exact = total = 0
    worst = 0.0
    for r, g, step in zip(ref, got, steps):
        diff = np.abs(r.astype(np.float64) - g)
        unit = step if step else 1e-3 * max(1.0, float(np.abs(r).max(initial=0)))
        within += int((diff <= unit * (1 + 1e-6)).sum())
        exact += int((diff == 0).sum())
        total += diff.size
        worst = max(worst, float(diff.max(initial=0)) / unit)
    return within / max(total, 1), worst, exact / max(total, 1)


def _output_dir(weights: Path) -> Path:
    """The weights' folder, refused when its mode has no write bit (root ignores modes, we do not)."""
    from utils.paths import check_writable_dir

    folder = weights.resolve().parent
    if not stat.S_IMODE(folder.stat().st_mode) & 0o222:
        raise ExportError(f"{folder}: folder is read-only; copy {weights.name} somewhere writable to export it")
    return check_writable_dir(folder)


def _load(weights: Path, device: torch.device, half: bool) -> tuple[torch.nn.Module, dict]:
    from utils.qat import load_model

    model, meta = load_model(weights, device="cpu", fuse=True)
    model = model.to(device if half else torch.device("cpu"))  # fp16 only exports on CUDA
    return (model.half() if half else model.float()).eval(), meta


def export_weights(weights: str | Path, imgsz: int | Sequence[int] = 640, batch_size: int = 1,
                   device: str = "cpu", half: bool = False, dynamic: bool = False, simplify: bool = False,
                   opset: int = 17, include: Any = ("onnx",), raw_head: bool = False, data: str | Path | None = None,
                   check_images: Sequence[str | Path] | None = None, exporter: str = "torchscript",
                   fixed_shape: bool = False, openvino_compat: bool = False, plain_qdq: bool = False) -> ExportResult:
    """Export a checkpoint (official or ours) to ``<weights stem>.onnx`` beside it and check it.

    ``check_images`` are letterboxed to imgsz for the onnxruntime-vs-PyTorch check (random inputs
    when None or empty). ``data`` (a dataset yaml) overrides the checkpoint's class names.
    """
    from utils.paths import file_size
    from utils.torch_utils import select_device

    t0 = time.time()
    check_include(include)
    options = OnnxOptions(opset=opset, dynamic=dynamic, raw_head=raw_head, half=half, simplify=simplify,
                          exporter=exporter, fixed_shape=fixed_shape or half,  # fp16 files keep upstream's fixed shape
                          openvino_compat=openvino_compat, plain_qdq=plain_qdq)
    options.validate()
    if batch_size < 1:
        raise ExportError(f"--batch-size {batch_size}: must be at least 1")
    images = [Path(p) for p in check_images or []]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: check image not found")
    weights = Path(weights)
    device = select_device(device)
    if half and device.type != "cuda":
        raise ExportError(f"--half needs a CUDA device (got {device.type}); use --device 0, or drop --half")
    model, meta = _load(weights, device, half)
    stride = max(int(model.stride.max()), 32)
    size = normalise_imgsz(imgsz, stride)
    names = names_from_data(data, meta["nc"]) if data else meta["names"]
    file = _output_dir(weights) / f"{weights.stem}.onnx"
    param = next(model.parameters())
    im = torch.zeros(batch_size, 3, *size, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        shape = tuple(model(im)[0].shape)
    LOGGER.info("PyTorch: starting from %s with output shape %s (%.1f MB)", weights, shape, file_size(weights))
    onnx = import_optional("onnx", "ONNX export")
    LOGGER.info("ONNX: starting export with onnx %s, opset %d, %s exporter...", onnx.__version__, opset, exporter)
    if meta.get("qat"):
        checks, ranges_file = _export_qat(model, im, file, options, names, size, batch_size, weights,
                                          _check_inputs(images, batch_size, size, dynamic, stride))
        metadata = dict(_read_metadata(file))
        LOGGER.info("Export complete (%.1fs)\nResults saved to %s\nValidate: python val.py --weights %s",
                    time.time() - t0, file.parent, file)
        return ExportResult(file, metadata, checks, ranges_file)
    metadata = build_metadata(model, names, size, batch_size, options, source=weights.name)
    export_onnx_float(model, im, file, options, metadata)
    LOGGER.info("ONNX: export success, %.1fs, saved as %s (%.1f MB)", time.time() - t0, file, file_size(file))
    checks = _verify(file, model, options, _check_inputs(images, batch_size, size, dynamic, stride))
    LOGGER.info("Export complete (%.1fs)\nResults saved to %s\nValidate: python val.py --weights %s",
                time.time() - t0, file.parent, file)
    return ExportResult(file, metadata, checks)


def _read_metadata(file: Path) -> dict[str, str]:
    onnx = import_optional("onnx", "ONNX export")
    return {p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props}


def _export_qat(model: torch.nn.Module, im: torch.Tensor, file: Path, options: OnnxOptions, names: dict,
                size: tuple[int, int], batch_size: int, weights: Path,
                inputs: list[torch.Tensor]) -> tuple[list[QdqCheck], Path]:
    """QDQ export of a QAT checkpoint + ranges JSON + the raw-map check (raises ExportError on failure)."""
    import json

    from quant.export import QUANT_SCHEME

    ranges_file = file.parent / f"{weights.stem}.ranges.json"
    quant = {"scheme": QUANT_SCHEME, "ranges": ranges_file.name}
    metadata = build_metadata(model, names, size, batch_size, options, source=weights.name, quant=quant)
    LOGGER.info("ONNX: QAT checkpoint, exporting INT8 QDQ (power-of-2 scales)")
    exported = export_onnx_qdq(model, im, file, options, metadata)
    ranges_file.write_text(json.dumps(exported.ranges, indent=1), encoding="utf-8")
    LOGGER.info("ONNX: quantization ranges saved to %s", ranges_file)
    checks = verify_qdq(file, model, inputs, options, converted=exported.converted)
    for check in checks:
        LOGGER.info("ONNX QDQ check: onnxruntime vs PyTorch QAT, %s", check.line())
    if any(c.qat_within < QDQ_MIN_FRACTION for c in checks):
        LOGGER.warning("ONNX QDQ: the fake-quant QAT model differs from its BN-folded integer form by more than "
                       "one step on %.2f%% of raw head values (float rounding flips in the simulated-BN path)",
                       100 * (1 - min(c.qat_within for c in checks)))
    failed = [c for c in checks if not c.passed]
    if failed:
        worst = min(failed, key=lambda c: c.fraction_within)
        raise ExportError(f"{file}: onnxruntime disagrees with the QAT model at input {worst.shape}: only "
                          f"{100 * worst.fraction_within:.3f}% of raw head values within one quantization step "
                          f"(need {100 * QDQ_MIN_FRACTION:.1f}%), max {worst.max_steps:.1f} steps")
    key, value = EXACT_INT8_CONFIG
    LOGGER.info("ONNX QDQ: checked with the onnxruntime session option %s=%s; set it in your own sessions too "
                "(on x86 CPUs without VNNI onnxruntime's default 8-bit kernels saturate; README, Runtimes)", key, value)
    return checks, ranges_file
