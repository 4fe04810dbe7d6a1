"""Run an exported ONNX detector with onnxruntime as a drop-in for the PyTorch model in validation.

:func:`load_onnx_model` returns an :class:`OnnxModel`: calling it with a float image batch (values in
[0, 1], NCHW) returns ``(decoded predictions (bs, N, 5 + nc), None)``, the same contract as
``DetectionModel`` in eval mode, so ``utils.eval.evaluate.evaluate`` scores it unchanged. Raw-head files
(three head maps, decoded on the NPU's DSP in deployment) are decoded here from the anchors and
strides stored in the file's metadata.

Example:
    >>> model, meta = load_onnx_model("yolov5n.onnx", "cpu")  # doctest: +SKIP
    >>> preds, _ = model(torch.zeros(1, 3, 320, 320))  # doctest: +SKIP
"""
from __future__ import annotations

import ast
import importlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from utils.names import normalise_names

__all__ = ["EXACT_INT8_CONFIG", "PRODUCER", "OnnxModel", "decode_raw_maps", "import_optional", "load_onnx_model",
           "onnxruntime_errors", "parse_metadata", "session_options", "session_providers"]

LOGGER = logging.getLogger(__name__)

PRODUCER = "yolov5-pow2-qat"  # metadata 'producer' of the files export.py writes

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def import_optional(name: str, purpose: str) -> Any:
    """Import an optional dependency, or raise ImportError in one line saying what needs it.

    Example:
        >>> ort = import_optional("onnxruntime", "running ONNX models")  # doctest: +SKIP
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"{name} is needed for {purpose} but could not be imported ({err}); "
                          f"install it with: pip install {name}") from None


def _literal(value: str | None, default: Any = None) -> Any:
    """A metadata value written as JSON (ours) or as a Python literal (upstream's names dict)."""
    if value is None:
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def parse_metadata(props: dict[str, str], input_shape: list, output_shapes: list[list],
                   source: str = "<onnx>") -> dict:
    """Our metadata dict from an ONNX file's metadata_props and its input/output shapes.

    Files from upstream YOLOv5 carry only 'stride' and 'names'; the rest is inferred from shapes.
    """
    names = normalise_names(_literal(props.get("names"), {}), source)
    raw_head = bool(_literal(props.get("raw_head"), False))
    no = _dim(output_shapes[0][-1]) if output_shapes and output_shapes[0] else None
    nc = int(_literal(props.get("nc"), 0)) or len(names) or ((no - 5) if no else 0)
    if not nc:
        raise ValueError(f"{source}: cannot tell the number of classes (no 'names' metadata, output shape "
                         f"{output_shapes[0] if output_shapes else None})")
    names = names or {i: str(i) for i in range(nc)}
    shape = list(input_shape) + [None] * 4
    batch, h, w = _dim(shape[0]), _dim(shape[2]), _dim(shape[3])
    imgsz = _literal(props.get("imgsz")) or [h, w]
    strides = _literal(props.get("strides")) or []
    meta = {
        "file": source, "names": names, "nc": nc,
        "stride": int(_literal(props.get("stride"), max(strides) if strides else 32)),
        "strides": [int(s) for s in strides], "anchors": _literal(props.get("anchors")),
        "imgsz": [int(x) if x else None for x in imgsz], "batch": batch if batch else "dynamic",
        "dynamic_hw": h is None or w is None, "raw_head": raw_head,
        "half": bool(_literal(props.get("half"), False)), "quant": _literal(props.get("quant")),
        "producer": props.get("producer", "unknown"),
    }
    if raw_head and (not meta["strides"] or not meta["anchors"]):
        raise ValueError(f"{source}: raw-head ONNX file lacks 'strides'/'anchors' metadata, cannot decode it")
    return meta


def decode_raw_maps(maps: list[torch.Tensor], anchors_px: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """Decode raw head maps (bs, na, ny, nx, no) into boxes (bs, N, no), as Detect does in eval mode.

    ``anchors_px`` is (nl, na, 2) in pixels. The arithmetic follows Detect's order of operations so
    results match the PyTorch model to float rounding.
    """
    out = []
    for i, x in enumerate(maps):
        bs, na, ny, nx, no = x.shape
        yv, xv = torch.meshgrid(torch.arange(ny, device=x.device, dtype=x.dtype),
                                torch.arange(nx, device=x.device, dtype=x.dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(1, na, ny, nx, 2) - 0.5
        anchor_grid = anchors_px[i].to(x).view(1, na, 1, 1, 2).expand(1, na, ny, nx, 2)
        xy, wh, conf = x.sigmoid().split((2, 2, no - 4), 4)
        xy = (xy * 2 + grid) * float(strides[i])
        wh = (wh * 2) ** 2 * anchor_grid
        out.append(torch.cat((xy, wh, conf), 4).view(bs, na * ny * nx, no))
    return torch.cat(out, 1)


class OnnxModel:
    """An onnxruntime session with DetectionModel's eval-mode call contract.

    A static batch size is served by running the input in chunks of that size (the last chunk
    zero-padded), so any dataloader batch size works. Static height/width must match the input.
    ``eval()``, ``float()`` and ``half()`` return ``self``: the precision is fixed in the file, and the
    input is cast to whatever type the file expects.
    """

    def __init__(self, session: Any, meta: dict, device: torch.device) -> None:
        self.session, self.meta, self.device = session, meta, device
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = _NUMPY_TYPES.get(inp.type, np.float32)
        self.output_names = [o.name for o in session.get_outputs()]
        self.names, self.nc = meta["names"], meta["nc"]
        self.stride = torch.tensor([float(meta["stride"])])
        self.last_input_shape: tuple = ()
        if meta["raw_head"]:
            self._anchors = torch.tensor(meta["anchors"], dtype=torch.float32)

    def eval(self) -> "OnnxModel":
        return self

    def float(self) -> "OnnxModel":
        return self

    def half(self) -> "OnnxModel":
        return self

    def _check_shape(self, im: torch.Tensor) -> None:
        h, w = self.meta["imgsz"]
        if not self.meta["dynamic_hw"] and tuple(im.shape[2:]) != (h, w):
            raise ValueError(f"{self.meta['file']}: static ONNX model takes {h}x{w} images, got "
                             f"{im.shape[2]}x{im.shape[3]}; export with --dynamic or validate at --imgsz {h}")

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        batch = self.meta["batch"]
        # what the session itself ran (a static batch runs in chunks), for val.py's Speed line
        self.last_input_shape = x.shape if batch == "dynamic" else (batch, *x.shape[1:])
        if batch == "dynamic" or x.shape[0] == batch:
            return self.session.run(self.output_names, {self.input_name: x})
        parts = []
        for i in range(0, x.shape[0], batch):
            chunk = x[i:i + batch]
            n = chunk.shape[0]
            if n < batch:  # pad the last chunk; its padded rows are dropped below
                chunk = np.concatenate((chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)), 0)
            parts.append([o[:n] for o in self.session.run(self.output_names, {self.input_name: chunk})])
        return [np.concatenate(p, 0) for p in zip(*parts)]

    def __call__(self, im: torch.Tensor, augment: bool = False) -> tuple[torch.Tensor, None]:
        if augment:
            raise ValueError(f"{self.meta['file']}: test-time augmentation (--augment) needs the PyTorch model")
        self._check_shape(im)
        x = np.ascontiguousarray(im.detach().cpu().numpy().astype(self.input_dtype, copy=False))
        outs = [torch.from_numpy(o).to(im.device) for o in self._run(x)]
        if self.meta["raw_head"]:
            preds = decode_raw_maps([o.float() for o in outs], self._anchors, self.meta["strides"])
        else:
            preds = outs[0]
        return preds.to(im.dtype), None


# onnxruntime's fastest 8-bit kernels on x86 CPUs without VNNI (AVX2, or AVX-512 before VNNI: many AMD
# EPYCs, older Xeons) add pairs of uint8 x int8 products in 16 bits, which saturates when both are large;
# this session option (documented in onnxruntime_session_options_config_keys.h) makes them use exact
# uint8 x uint8 kernels on those CPUs and changes nothing on others. Measured on an AVX2-only EPYC
# (notes/runtimes.md): without it yolov5n's INT8 head values were up to 30 steps off.
EXACT_INT8_CONFIG = ("session.x64quantprecision", "1")


def session_options(ort: Any, threads: int = 0, spin: Optional[bool] = None, optimize: bool = True,
                    exact_int8: bool = True) -> Any:
    """onnxruntime SessionOptions for every session this project opens: exact 8-bit arithmetic on every
    x86 CPU (:data:`EXACT_INT8_CONFIG`; ``exact_int8=False`` leaves onnxruntime's default kernels, which
    bench.runtime_agreement compares); ``threads`` > 0 caps the intra-op threads; ``spin`` sets whether
    idle threads busy-wait (None: onnxruntime's default); ``optimize=False`` turns every graph
    optimisation off (the specification's arithmetic, node by node)."""
    options = ort.SessionOptions()
    if exact_int8:
        options.add_session_config_entry(*EXACT_INT8_CONFIG)
    if threads > 0:
        options.intra_op_num_threads = threads
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def session_providers(ort: Any, device: torch.device) -> list[str]:
    """CUDA then CPU provider for a CUDA device when onnxruntime-gpu offers it, else CPU only."""
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        LOGGER.warning("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); using CPU")
    return ["CPUExecutionProvider"]


def onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's load errors (InvalidProtobuf, InvalidGraph, Fail...) derive from Exception directly."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph",
             "NotImplemented", "RuntimeException", "EPFail")
    return (RuntimeError, ValueError, *(getattr(state, n) for n in names if hasattr(state, n)))


def load_onnx_model(path: str | Path, device: str | torch.device = "cpu", threads: int = 0,
                    spin: bool = False, exact_int8: bool = True) -> tuple[OnnxModel, dict]:
    """Open an ONNX detector for validation; returns (callable model, meta).

    meta: file, names, nc, stride (max, int), strides, anchors (pixels), imgsz [h, w], batch (int or
    'dynamic'), dynamic_hw, raw_head, half, quant (None for float files), producer. ``threads`` > 0
    caps onnxruntime's intra-op threads (0: its default). ``spin=False`` stops its idle threads from
    busy-waiting after each run, which would steal the CPU from the NMS that validation runs next;
    latency benchmarks pass True (onnxruntime's default). ``exact_int8=False`` runs onnxruntime's default
    8-bit kernels, which saturate on x86 CPUs without VNNI (:data:`EXACT_INT8_CONFIG`; benchmarks only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX file not found")
    ort = import_optional("onnxruntime", "running ONNX models")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    options = session_options(ort, threads, spin, exact_int8=exact_int8)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=session_providers(ort, device))
    except onnxruntime_errors() as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: onnxruntime cannot load it: {first}") from err
    props = dict(session.get_modelmeta().custom_metadata_map)
    meta = parse_metadata(props, list(session.get_inputs()[0].shape),
                          [list(o.shape) for o in session.get_outputs()], source=str(path))
    LOGGER.info("Loaded %s (onnxruntime %s, %s): imgsz %s, batch %s, %s head", path.name, ort.__version__,
                session.get_providers()[0], meta["imgsz"], meta["batch"], "raw" if meta["raw_head"] else "decoded")
    return OnnxModel(session, meta, device), meta
