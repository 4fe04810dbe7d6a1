"""The YOLOv5 v7.0 detection model, built from a model yaml.

Official checkpoints pickle ``models.yolo.Model`` (an alias of :class:`DetectionModel`) and
``models.yolo.Detect``; methods here only read attributes those pickles also carry.

Example:
    >>> model = DetectionModel("yolov5s.yaml", act="relu")
    >>> model.stride
    tensor([ 8., 16., 32.])
"""
from __future__ import annotations

import ast
import inspect
import logging
import math
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.activations import ActivationSpec, activation_name, is_activation, make_activation
from models.common import BN_EPS, BN_MOMENTUM, C3, SPPF, Bottleneck, Concat, Conv, fuse_conv_bn
from models.yaml_checks import check_model_yaml, read_yaml

__all__ = ["Detect", "DetectionModel", "Model", "REGISTRY", "parse_model", "convert_activation",
           "make_divisible", "load_model_yaml"]

LOGGER = logging.getLogger(__name__)
MODELS_DIR = Path(__file__).resolve().parent


class Detect(nn.Module):
    """Detection head: one 1x1 conv per pyramid level, decoding boxes against anchors in eval mode.

    ``anchors`` is a buffer of shape (nl, na, 2) in grid units (pixels / stride), as v7.0 stores it.
    With ``export_raw=True`` eval mode returns the raw head maps (for export) instead of boxes.
    """

    def __init__(self, nc: int = 80, anchors: Any = (), ch: Any = (), inplace: bool = True,
                 export_raw: bool = False) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # x, y, w, h, objectness, classes
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace
        self.export_raw = export_raw
        self.stride = torch.ones(self.nl)  # replaced by DetectionModel once strides are measured

    def __setstate__(self, state: dict) -> None:
        # Unpickling an official checkpoint: v6.0 kept anchor_grid as a buffer (anchors in pixels,
        # derivable from anchors x stride); turn it into the per-level cache later releases use.
        super().__setstate__(state)
        if "anchor_grid" in self._buffers:
            del self._buffers["anchor_grid"]
        if not isinstance(self.__dict__.get("anchor_grid"), list):
            self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        if not isinstance(self.__dict__.get("grid"), list):
            self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.__dict__.setdefault("export_raw", False)

    def forward(self, x: list[torch.Tensor], image: torch.Tensor | None = None) -> Any:
        """``image`` (the network input), when given, supplies the batch size and grid sizes, so an
        ONNX export with free height/width reads them from the input's shape and never from a head
        conv's (quantized) output; see :func:`utils.export.onnx_export.route_image_to_head`."""
        x = list(x)
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            if image is not None:  # inputs are multiples of the largest stride, so the division is exact
                s = int(self.stride[i])
                bs, ny, nx = image.shape[0], image.shape[2] // s, image.shape[3] // s
            if torch.onnx.is_in_onnx_export():
                # The same values through channels-last: onnxruntime's integer convs write NHWC, and this
                # order leaves it one transpose per level instead of two (notes/qat_speed.md, sixth round)
                x[i] = x[i].permute(0, 2, 3, 1).reshape(bs, ny, nx, self.na, self.no).permute(0, 3, 1, 2, 4).contiguous()
            else:
                x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.training or self.export_raw:
                continue
            grid = self.grid[i]
            if grid.shape[2:4] != (ny, nx) or grid.device != x[i].device or grid.dtype != x[i].dtype:
                self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i, x[i])
            xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + self.grid[i]) * self.stride[i]
            wh = (wh * 2) ** 2 * self.anchor_grid[i]
            z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        if self.training or self.export_raw:
            return x
        return torch.cat(z, 1), x

    def _make_grid(self, nx: int, ny: int, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell offsets (minus 0.5, as v7.0) and anchor sizes in pixels, shaped (1, na, ny, nx, 2)."""
        d, t = like.device, like.dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        stride = self.stride[i].to(device=d, dtype=t)
        anchor_grid = (self.anchors[i].to(t) * stride).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x``."""
    return int(math.ceil(x / divisor) * divisor)


# Module names a model yaml may use. Channel blocks take (c1, c2, ...) with c2 scaled by the width
# gain; repeat blocks also take the repeat count as their third argument.
REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "Conv": Conv, "Bottleneck": Bottleneck, "C3": C3, "SPPF": SPPF, "Concat": Concat, "Detect": Detect,
    "nn.Upsample": nn.Upsample, "Upsample": nn.Upsample, "torch.nn.Upsample": nn.Upsample,
    "nn.BatchNorm2d": nn.BatchNorm2d, "nn.MaxPool2d": nn.MaxPool2d, "nn.Identity": nn.Identity,
}
CHANNEL_BLOCKS: set[Callable[..., nn.Module]] = {Conv, Bottleneck, C3, SPPF}
REPEAT_BLOCKS: set[Callable[..., nn.Module]] = {C3}


def _resolve_arg(value: Any, symbols: dict[str, Any]) -> Any:
    """Yaml argument -> value: symbols ('nc', 'anchors'), then Python literals, else the string."""
    if not isinstance(value, str):
        return value
    if value in symbols:
        return symbols[value]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # e.g. 'nearest'


def _takes_act(block: Callable[..., nn.Module], args: list[Any]) -> bool:
    """True if ``block`` accepts ``act`` and the yaml row did not already pass it positionally."""
    try:
        bound = inspect.signature(block).bind_partial(*args)
    except (TypeError, ValueError):
        return False
    return "act" in inspect.signature(block).parameters and "act" not in bound.arguments


def _layer_args(block: Callable[..., nn.Module], args: list[Any], f: int | list[int], ch: list[int],
                n: int, no: int, gw: float) -> tuple[list[Any], int | None, int]:
    """Apply upstream's channel bookkeeping; returns (args, output channels, repeats)."""
    if block in CHANNEL_BLOCKS:
        c1, c2 = ch[f], args[0]
        if c2 != no:  # the raw head width is never scaled
            c2 = make_divisible(c2 * gw, 8)
        args = [c1, c2, *args[1:]]
        if block in REPEAT_BLOCKS:
            args.insert(2, n)
            n = 1
    elif block is nn.BatchNorm2d:
        args, c2 = [ch[f]], ch[f]
    elif block is Concat:
        c2 = sum(ch[x] for x in f)
    elif block is Detect:
        args.append([ch[x] for x in f])
        if isinstance(args[1], int):  # a number of anchors per level instead of a list
            args[1] = [list(range(args[1] * 2))] * len(f)
        c2 = None
    else:
        c2 = ch[f]
    return args, c2, n


def parse_model(d: dict, ch: list[int], act: ActivationSpec = None,
                source: str = "<dict>") -> tuple[nn.Sequential, list[int]]:
    """Build the layer list of a model dict; returns (nn.Sequential of layers, sorted save indices).

    Each layer gets upstream's attributes ``i`` (index), ``f`` (from), ``type`` and ``np`` (params).
    """
    anchors, nc = d["anchors"], d["nc"]
    gd, gw = d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    symbols = {"nc": nc, "anchors": anchors, "None": None}
    layers, save, c2 = [], [], ch[-1]
    for i, row in enumerate(d["backbone"] + d["head"]):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ValueError(f"{source}: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, name, args = row
        block = REGISTRY.get(name) if isinstance(name, str) else None
        if block is None:
            raise ValueError(f"{source}: layer {i} uses unknown module {name!r}; known: {', '.join(REGISTRY)}")
        args = [_resolve_arg(a, symbols) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        try:  # a wrong argument (e.g. a string as channel count) is the yaml's fault: say which layer
            args, c2, n = _layer_args(block, args, f, ch, n, no, gw)
            kwargs = {"act": act} if act is not None and _takes_act(block, args) else {}
            m_ = nn.Sequential(*(block(*args, **kwargs) for _ in range(n))) if n > 1 else block(*args, **kwargs)
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(f"{source}: layer {i} ({name} {args}) could not be built: {err}") from err
        m_.i, m_.f = i, f
        m_.type = f"{block.__module__}.{block.__qualname__}"
        m_.np = sum(x.numel() for x in m_.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def load_model_yaml(cfg: str | Path) -> tuple[dict, Path]:
    """Read a model yaml; a bare name such as 'yolov5s.yaml' is also looked up in models/."""
    path = Path(cfg)
    if not path.is_file() and (MODELS_DIR / path.name).is_file():
        path = MODELS_DIR / path.name
    if not path.is_file():
        raise FileNotFoundError(f"{cfg}: model yaml not found (also looked in {MODELS_DIR})")
    return check_model_yaml(read_yaml(path, "model"), str(path)), path


def _scale_img(img: torch.Tensor, ratio: float, gs: int) -> torch.Tensor:
    """Resize a batch by ``ratio`` and pad to a multiple of ``gs`` with upstream's grey (0.447)."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


class DetectionModel(nn.Module):
    """YOLOv5 detection model built from a yaml path, a bare yaml name in models/, or a dict.

    ``act`` (e.g. 'relu') overrides the yaml's ``activation:`` key, which overrides SiLU.
    torch.fx can trace it in train mode, or in eval mode with ``model.model[-1].export_raw = True``
    (pass ``concrete_args={'augment': False}``); box decoding itself is not traceable.
    """

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors: Any = None, act: ActivationSpec = None) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml, source = deepcopy(cfg), "<dict>"
        else:
            self.yaml, path = load_model_yaml(cfg)
            self.yaml_file, source = path.name, str(path)
        check_model_yaml(self.yaml, source)  # types and ranges first: errors name the key, not a traceback
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info("Overriding model yaml nc=%s with nc=%s", self.yaml["nc"], nc)
            self.yaml["nc"] = nc
        if anchors:
            self.yaml["anchors"] = round(anchors)
        act = act if act is not None else self.yaml.get("activation")
        if act is not None:
            # A canonical string: every block then builds its own instance (never a shared module).
            act = self.yaml["activation"] = activation_name(act)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch], act=act, source=source)
        self.names = {i: str(i) for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.inplace = self.inplace
            self._init_stride_and_anchors(m, ch, source=source)
        else:
            self.stride = torch.tensor([32.0])
        self._init_norm_and_acts()

    def _init_stride_and_anchors(self, m: Detect, ch: int, s: int = 256, source: str = "<dict>") -> None:
        """Measure strides with a dummy forward, order anchors to match, set biases (as v7.0)."""
        try:
            with torch.no_grad():
                outs = self._forward_once(torch.zeros(1, ch, s, s))
        except (RuntimeError, TypeError, ValueError, IndexError) as err:  # layers that build but can not run
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{source}: the model does not run on a {s}x{s} input: {first}") from err
        m.stride = torch.tensor([s / x.shape[-2] for x in outs])
        area = m.anchors.prod(-1).mean(-1).view(-1)  # mean anchor area per level
        if (area[-1] - area[0]) and (area[-1] - area[0]).sign() != (m.stride[-1] - m.stride[0]).sign():
            LOGGER.info("Reversing anchor order to match stride order")
            m.anchors[:] = m.anchors.flip(0)
        m.anchors /= m.stride.view(-1, 1, 1)
        self.stride = m.stride
        self._initialize_biases()

    def _initialize_biases(self) -> None:
        """Objectness prior of ~8 objects per 640 image, class prior 0.6/nc (upstream's init)."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:5 + m.nc] += math.log(0.6 / (m.nc - 0.99))
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def _init_norm_and_acts(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.eps, mod.momentum = BN_EPS, BN_MOMENTUM
            elif is_activation(mod):
                mod.inplace = True

    def info(self, verbose: bool = False, img_size: int | list[int] = 640) -> dict:
        """Log and return the size summary (layers, parameters, gradients, GFLOPs)."""
        from models.summary import model_info  # summary imports nothing from here; kept local anyway

        return model_info(self, img_size, verbose)

    def forward(self, x: torch.Tensor, augment: bool = False) -> Any:
        """Train: list of raw maps. Eval: (boxes (bs, N, no) in pixels, raw maps). ``augment``: TTA."""
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor) -> Any:
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _forward_augment(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Test-time augmentation: scales 1, 0.83, 0.67 with a left-right flip at 0.83 (as v7.0)."""
        img_size = x.shape[-2:]
        outputs = []
        for scale, flip in zip((1, 0.83, 0.67), (None, 3, None)):
            xi = _scale_img(x.flip(flip) if flip else x, scale, gs=int(self.stride.max()))
            yi = self._forward_once(xi)[0]
            outputs.append(self._descale_pred(yi, flip, scale, img_size))
        return torch.cat(self._clip_augmented(outputs), 1), None

    def _descale_pred(self, p: torch.Tensor, flips: int | None, scale: float, img_size) -> torch.Tensor:
        """Undo TTA scaling and flips on decoded predictions."""
        if self.inplace:
            p[..., :4] /= scale
            if flips == 2:
                p[..., 1] = img_size[0] - p[..., 1]
            elif flips == 3:
                p[..., 0] = img_size[1] - p[..., 0]
            return p
        x, y, wh = p[..., 0:1] / scale, p[..., 1:2] / scale, p[..., 2:4] / scale
        if flips == 2:
            y = img_size[0] - y
        elif flips == 3:
            x = img_size[1] - x
        return torch.cat((x, y, wh, p[..., 4:]), -1)

    def _clip_augmented(self, y: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop the largest-object level of the first pass and the smallest of the last (as v7.0)."""
        nl = self.model[-1].nl
        g = sum(4 ** x for x in range(nl))  # grid points, relative to the coarsest level
        e = 1  # levels excluded
        i = (y[0].shape[1] // g) * sum(4 ** x for x in range(e))
        y[0] = y[0][:, :-i]
        i = (y[-1].shape[1] // g) * sum(4 ** (nl - 1 - x) for x in range(e))
        y[-1] = y[-1][:, i:]
        return y

    def fuse(self) -> "DetectionModel":
        """Fold every Conv block's BatchNorm into its conv (bn becomes nn.Identity); for inference."""
        for m in self.model.modules():
            if isinstance(m, Conv) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
                m.conv = fuse_conv_bn(m.conv, m.bn)
                m.bn = nn.Identity()
        return self

    def _apply(self, fn, *args, **kwargs):
        # stride and grids are plain attributes of Detect, so move/cast them with the model.
        self = super()._apply(fn, *args, **kwargs)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.grid = list(map(fn, m.grid))
            if isinstance(m.anchor_grid, list):
                m.anchor_grid = list(map(fn, m.anchor_grid))
            self.stride = m.stride
        return self


Model = DetectionModel  # official checkpoints pickle this name


def convert_activation(model: nn.Module, act: ActivationSpec) -> nn.Module:
    """Give every Conv block a fresh activation of kind ``act`` (Identity ones stay Identity).

    Also records the choice in ``model.yaml['activation']`` so checkpoints rebuild it.
    """
    name = activation_name(act)
    for m in model.modules():
        if isinstance(m, Conv) and not isinstance(m.act, nn.Identity):
            m.act = make_activation(name)
    if isinstance(getattr(model, "yaml", None), dict):
        model.yaml["activation"] = name
    return model
