"""Export a detector to ONNX (float, decoded or raw head) with the metadata val.py and detect tools read.

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): in torch
2.9-2.13 it exports this model in well under a second, keeps dynamic batch/height/width through the
head's grid arithmetic, and maps fake-quant ops to QuantizeLinear/DequantizeLinear for the QDQ export
that comes later. ``exporter="dynamo"`` selects the torch.export-based one for when the legacy one is
gone; it works too but takes ~10 s and needs height/width declared as multiples of 32.

One function per kind of file: :func:`export_onnx_float` for float models and :func:`export_onnx_qdq`
for QAT (prepared) models, which writes QuantizeLinear/DequantizeLinear with power-of-2 scales
(see :mod:`quant.export`); both reuse :func:`build_metadata` and :func:`write_metadata`.

Example:
    >>> model, _ = load_model("yolov5n.pt", fuse=True)  # doctest: +SKIP
    >>> export_onnx_float(model, torch.zeros(1, 3, 320, 320), Path("yolov5n.onnx"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.yolo import Detect
from utils.export.onnx_backend import PRODUCER, import_optional

__all__ = ["ExportError", "OnnxOptions", "SUPPORTED_FORMATS", "build_metadata", "check_include",
           "export_onnx_float", "export_onnx_qdq", "io_names", "prepare_for_export", "route_image_to_head",
           "simplify_onnx", "write_metadata"]

LOGGER = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("onnx",)
TORCHSCRIPT_OPSETS = (11, 20)  # what torch's TorchScript-based exporter can write
DYNAMO_OPSETS = (11, 23)


class ExportError(ValueError):
    """An export request that cannot be met, or an exported file that fails its checks."""


@dataclass(frozen=True)
class OnnxOptions:
    """How to write the ONNX file. Height and width are free dimensions unless ``fixed_shape`` (so
    val.py can feed the same rectangular batches as for the .pt file); ``dynamic`` frees the batch
    size too."""

    opset: int = 17
    dynamic: bool = False
    fixed_shape: bool = False
    raw_head: bool = False
    openvino_compat: bool = False  # QDQ only: quant.qdq_onnx.openvino_guards
    plain_qdq: bool = False  # QDQ only: no SpaceToDepth stem or padded head (quant.qdq_onnx.finalize_qdq_onnx)
    half: bool = False
    simplify: bool = False
    exporter: str = "torchscript"  # or 'dynamo'

    def validate(self) -> None:
        if self.exporter not in ("torchscript", "dynamo"):
            raise ExportError(f"exporter {self.exporter!r}: use 'torchscript' or 'dynamo'")
        lo, hi = TORCHSCRIPT_OPSETS if self.exporter == "torchscript" else DYNAMO_OPSETS
        if not lo <= self.opset <= hi:
            raise ExportError(f"--opset {self.opset}: the {self.exporter} exporter writes opsets {lo}-{hi}")
        if self.half and self.dynamic:
            raise ExportError("--half is not compatible with --dynamic; use one or the other (as upstream)")
        if self.dynamic and self.fixed_shape:
            raise ExportError("--dynamic and --fixed-shape contradict each other; use one")


def check_include(include: Any) -> list[str]:
    """Normalise --include to a list of supported format names, refusing the others in one line."""
    items = [include] if isinstance(include, str) else list(include or [])
    formats = [str(x).lower().strip(". ") for x in items]
    bad = [x for x in formats if x not in SUPPORTED_FORMATS]
    if bad or not formats:
        raise ExportError(f"--include {' '.join(map(str, items)) or '(empty)'}: not supported; supported "
                          f"formats: {', '.join(SUPPORTED_FORMATS)}")
    return list(dict.fromkeys(formats))


class _DecodedHead(nn.Module):
    """The model with a single output: decoded boxes (bs, N, 5 + nc), as upstream exports it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


class _RawHead(nn.Module):
    """The model with one output per pyramid level: raw maps (bs, na, ny, nx, 5 + nc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x))


def _detect(model: nn.Module) -> Detect:
    head = model.model[-1] if hasattr(model, "model") else None
    if not isinstance(head, Detect):
        raise ExportError(f"{type(model).__name__}: last layer is not a Detect head, cannot export")
    return head


def route_image_to_head(model: nn.Module) -> nn.Module:
    """Pass the network input to the Detect call of a traced (torch.fx) model; returns ``model``.

    The head then takes its batch and grid sizes from the input's shape (``Detect.forward(x, image)``).
    With free height/width, reading them from a head conv's output instead puts Shape ops on that
    conv's quantized output: onnxruntime then leaves the conv float (its int8 output pair has other
    readers, so it cannot become QLinearConv's uint8 output), and OpenVINO 2026.4 applies channel 0's
    bias to every channel of that conv (README, "Runtimes"). Numerically nothing changes.
    Eager models (no fx graph) are returned as they are.
    """
    graph = getattr(model, "graph", None)
    if graph is None:
        return model
    image = next((n for n in graph.nodes if n.op == "placeholder"), None)
    changed = False
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), Detect) \
                and image is not None and "image" not in node.kwargs:
            node.kwargs = {**node.kwargs, "image": image}
            changed = True
    if changed:
        model.recompile()
    return model


def prepare_for_export(model: nn.Module, raw_head: bool = False) -> nn.Module:
    """Eval-mode wrapper with the outputs the ONNX file will have; sets ``Detect.export_raw``.

    The head's grid cache is emptied so the grids are computed inside the traced graph from the
    input's shape; a cached grid would be baked in as a constant and break dynamic height/width.
    """
    model.eval()
    head = _detect(model)
    head.export_raw = raw_head
    head.grid = [torch.empty(0) for _ in range(head.nl)]
    head.anchor_grid = [torch.empty(0) for _ in range(head.nl)]
    return (_RawHead(model) if raw_head else _DecodedHead(model)).eval()


def io_names(nl: int, raw_head: bool) -> tuple[list[str], list[str]]:
    """Input and output names: 'images' -> 'output0' (upstream's), or 'output0'..'output{nl-1}' raw."""
    return ["images"], [f"output{i}" for i in range(nl if raw_head else 1)]


def _dynamic_axes(outputs: list[str], raw_head: bool, batch: bool = True) -> dict[str, dict[int, str]]:
    """Free height/width (and the batch when ``batch``) of the input and the matching output axes."""
    first = {0: "batch"} if batch else {}
    axes = {"images": {**first, 2: "height", 3: "width"}}
    for i, name in enumerate(outputs):
        axes[name] = {**first, 2: f"ny{i}", 3: f"nx{i}"} if raw_head else {**first, 1: "anchors"}
    return axes


def _torch_export(wrapper: nn.Module, im: torch.Tensor, file: Path, options: OnnxOptions,
                  outputs: list[str]) -> None:
    """Call torch.onnx.export with the chosen exporter; errors become one-line ExportErrors."""
    kwargs: dict[str, Any] = dict(opset_version=options.opset, input_names=["images"], output_names=outputs)
    if options.exporter == "dynamo":
        if not options.fixed_shape:
            dim = torch.export.Dim
            shapes = {2: 32 * dim("h32", min=1, max=256), 3: 32 * dim("w32", min=1, max=256)}
            kwargs["dynamic_shapes"] = {"x": {0: dim("batch"), **shapes} if options.dynamic else shapes}
        kwargs.update(dynamo=True, external_data=False)
    else:
        kwargs.update(dynamo=False, do_constant_folding=True,
                      dynamic_axes=None if options.fixed_shape else _dynamic_axes(outputs, options.raw_head,
                                                                                   batch=options.dynamic))
    with warnings.catch_warnings():
        # The TorchScript exporter warns on every call that it is deprecated; the module docstring
        # says why we still choose it. Tracer warnings about Python-side shape checks are expected.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(wrapper, (im,), str(file), **kwargs)
        except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ExportError(f"{file}: torch.onnx.export ({options.exporter}) failed: {first}") from err


def build_metadata(model: nn.Module, names: dict[int, str], imgsz: tuple[int, int], batch: int,
                   options: OnnxOptions, source: str = "", quant: Any = None) -> dict[str, str]:
    """metadata_props for the file. 'stride' and 'names' are written as upstream v7.0 writes them
    (int, Python dict literal) so upstream tools read our files; the other values are JSON."""
    head = _detect(model)
    strides = [int(s) for s in head.stride.tolist()]
    anchors_px = (head.anchors.float().cpu() * head.stride.float().cpu().view(-1, 1, 1)).tolist()
    return {
        "stride": str(max(strides)), "names": str({int(k): str(v) for k, v in names.items()}),
        "nc": str(int(head.nc)), "imgsz": json.dumps([int(x) for x in imgsz]),
        "batch": "dynamic" if options.dynamic else str(int(batch)), "dynamic": json.dumps(options.dynamic),
        "raw_head": json.dumps(options.raw_head), "half": json.dumps(options.half),
        "strides": json.dumps(strides), "anchors": json.dumps([[[round(v, 4) for v in a] for a in lvl]
                                                               for lvl in anchors_px]),
        "quant": json.dumps(quant), "producer": PRODUCER, "source": source,
    }


def write_metadata(file: Path, metadata: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``metadata``, then run onnx.checker on it."""
    onnx = import_optional("onnx", "ONNX export")
    model = onnx.load(str(file))
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{file}: onnx.checker rejected the exported model: {str(err).splitlines()[0]}") from err
    onnx.save(model, str(file))


def simplify_onnx(file: Path) -> bool:
    """Simplify in place with onnxslim, else onnx-simplifier, when one is installed; False if skipped."""
    onnx = import_optional("onnx", "ONNX export")
    for name in ("onnxslim", "onnxsim"):
        try:
            tool = __import__(name)
        except ImportError:
            continue
        model = onnx.load(str(file))
        if name == "onnxslim":
            simplified = tool.slim(model)
        else:
            simplified, ok = tool.simplify(model)
            if not ok:
                raise ExportError(f"{file}: onnx-simplifier could not verify the simplified model")
        onnx.save(simplified, str(file))
        LOGGER.info("ONNX: simplified with %s %s", name, getattr(tool, "__version__", ""))
        return True
    LOGGER.warning("ONNX: --simplify skipped: neither onnxslim nor onnxsim is installed (pip install onnxslim)")
    return False


def export_onnx_float(model: nn.Module, im: torch.Tensor, file: Path, options: OnnxOptions = OnnxOptions(),
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a float (fp32, or fp16 with ``options.half``) ONNX file of ``model`` traced on ``im``.

    ``model`` is a fused DetectionModel in eval mode on im's device. The head is decoded unless
    ``options.raw_head``. Metadata is attached and the file passes onnx.checker; the numerical check
    against PyTorch is :func:`utils.export.onnx_check.verify_onnx`.
    """
    options.validate()
    if options.openvino_compat:
        LOGGER.warning("ONNX: --openvino-compat changes QDQ (QAT) exports only; a float model needs nothing")
    if options.plain_qdq:
        LOGGER.warning("ONNX: --plain-qdq changes QDQ (QAT) exports only; a float model is written as traced")
    import_optional("onnx", "ONNX export")  # the exporter needs it; say so before tracing
    wrapper = prepare_for_export(model, options.raw_head)
    _, outputs = io_names(_detect(model).nl, options.raw_head)
    file = Path(file)
    _torch_export(wrapper, im, file, options, outputs)
    if options.simplify:
        simplify_onnx(file)
    write_metadata(file, metadata or {})
    return file


def export_onnx_qdq(prepared: nn.Module, im: torch.Tensor, file: Path, options: OnnxOptions = OnnxOptions(),
                    metadata: dict[str, str] | None = None, converted: nn.Module | None = None):
    """Write a QDQ ONNX file of a prepared (QAT) model traced on ``im`` through
    :func:`quant.export.export_qdq` (BN folded, int8 per-channel weights, int32 biases at s_in * s_w,
    uint8/int8 activations with power-of-2 scales, structure checked); here only the YOLO wrapper,
    the exporter options and the metadata are added. Returns the :class:`quant.export.QdqExport`
    (its ``ranges`` are the ``.ranges.json`` content). fp16 and the dynamo exporter are refused.
    """
    from quant.export import export_qdq

    options.validate()
    if options.half or options.exporter != "torchscript":
        raise ExportError(f"{file}: a QAT model exports as INT8 QDQ with the torchscript exporter only "
                          f"(got half={options.half}, exporter={options.exporter!r})")
    import_optional("onnx", "ONNX export")
    _, outputs = io_names(_detect(prepared).nl, options.raw_head)
    file = Path(file)
    try:
        result = export_qdq(prepared, im, file,
                            wrap=lambda m: prepare_for_export(route_image_to_head(m), options.raw_head),
                            torch_export=lambda m, x, f: _torch_export(m, x, f, options, outputs),
                            converted=converted, openvino_compat=options.openvino_compat,
                            kernel_layout=not options.plain_qdq)
    except ExportError:
        raise
    except ValueError as err:
        raise ExportError(f"{file}: {err}") from err
    if options.simplify:
        LOGGER.warning("ONNX: --simplify skipped for a QDQ model (simplifiers may fold Q/DQ pairs)")
    write_metadata(file, metadata or {})
    summary = result.summary
    LOGGER.info("ONNX QDQ: %d QuantizeLinear, %d DequantizeLinear, zero points %s, %d aligned concats",
                summary["quantize"], summary["dequantize"], summary["zero_point_dtypes"], summary["aligned_concats"])
    result.ranges["onnx_summary"] = summary
    return result
