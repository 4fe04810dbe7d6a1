"""Torch helpers for training and validation: device choice, seeding, EMA weights, optimizer groups,
learning-rate lambdas, early stopping and state-dict matching (behaviour of YOLOv5 v7.0)."""
from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

LOGGER = logging.getLogger(__name__)

# Normalization layers: their weights (scales) are trained without weight decay, as upstream does.
NORM_LAYERS = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))


def _parse_device(device: str | int | torch.device | None) -> str:
    """Normalise a device request to '', 'cpu', 'mps' or a comma-separated list of CUDA ids."""
    text = str(device if device is not None else "").strip().lower().replace(" ", "")
    text = text.replace("cuda:", "").replace("none", "")
    return "0" if text == "cuda" else text


def select_device(device: str | int | torch.device | None = "", batch_size: int = 0) -> torch.device:
    """Pick the torch device for a ``--device`` value: '' (first GPU, else CPU), 'cpu', 'mps',
    '0' or '0,1' (CUDA ids; the first one is returned, DDP sets its own per rank).

    Unlike upstream, the environment (CUDA_VISIBLE_DEVICES) is not modified: ids are validated against
    ``torch.cuda.device_count()``. An unusable request raises ValueError.
    """
    request = _parse_device(device)
    header = f"Python-{platform.python_version()} torch-{torch.__version__} "
    if request == "cpu":
        LOGGER.info(header + "CPU")
        return torch.device("cpu")
    if request == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps: Apple MPS is not available on this machine, use --device cpu")
        LOGGER.info(header + "MPS")
        return torch.device("mps")
    if not request:
        if not torch.cuda.is_available():
            LOGGER.info(header + "CPU")
            return torch.device("cpu")
        request = "0"
    ids = _cuda_ids(request, batch_size)
    lines = []
    for i in ids:
        p = torch.cuda.get_device_properties(i)
        lines.append(f"CUDA:{i} ({p.name}, {p.total_memory / (1 << 20):.0f}MiB)")
    LOGGER.info(header + ("\n" + " " * len(header)).join(lines))
    return torch.device(f"cuda:{ids[0]}")


def _cuda_ids(request: str, batch_size: int) -> list[int]:
    """Validate comma-separated CUDA ids against the visible devices and the batch size."""
    try:
        ids = [int(x) for x in request.split(",") if x != ""]
    except ValueError:
        raise ValueError(f"--device {request!r}: expected 'cpu', 'mps' or CUDA ids like '0' or '0,1'") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [i for i in ids if not 0 <= i < count]
    if not ids or bad:
        raise ValueError(f"--device {request!r}: invalid CUDA device(s) {bad or request}, "
                         f"{count} visible; use --device cpu or valid ids")
    if len(ids) > 1 and batch_size > 0 and batch_size % len(ids):
        raise ValueError(f"--batch-size {batch_size} is not a multiple of the {len(ids)} GPUs in --device {request}")
    return ids


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device).

    ``deterministic`` also asks torch for deterministic algorithms (warning, not failing, on ops that
    have none) and cuDNN determinism; cuBLAS needs CUBLAS_WORKSPACE_CONFIG, which is set only if unset.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def time_sync() -> float:
    """A timer reading (seconds) taken after pending CUDA work finished, for honest durations."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def is_parallel(model: nn.Module) -> bool:
    """True for a model wrapped in DataParallel or DistributedDataParallel."""
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DP/DDP wrapper (the model itself otherwise)."""
    return model.module if is_parallel(model) else model


@contextmanager
def torch_distributed_zero_first(local_rank: int) -> Iterator[None]:
    """Let the local master (rank 0) run the block first while the other ranks wait, e.g. for caching."""
    import torch.distributed as dist

    def barrier() -> None:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[max(local_rank, 0)])
        else:
            dist.barrier()

    if local_rank not in (-1, 0):
        barrier()
    yield
    if local_rank == 0:
        barrier()


def smart_inference_mode(enabled: bool = True) -> torch.inference_mode:
    """Decorator/context manager for evaluation code: ``@smart_inference_mode()``.

    Tensors created inside cannot later take part in autograd; use it for validation and export only.
    """
    return torch.inference_mode(enabled)


def intersect_dicts(da: dict, db: dict, exclude: Iterable[str] = ()) -> dict:
    """Entries of ``da`` whose key is in ``db`` with the same shape and contains no ``exclude`` substring."""
    exclude = tuple(exclude)
    return {k: v for k, v in da.items()
            if k in db and not any(x in k for x in exclude) and v.shape == db[k].shape}


class ModelEMA:
    """Exponential moving average of a model's state (weights AND buffers), as in YOLOv5 v7.0.

    The decay ramps up as ``decay * (1 - exp(-updates / tau))`` so early, noisy weights fade fast.
    Floating-point entries are averaged; other entries (counters, flags, integer buffers) are copied,
    and so is all state of modules that declare ``ema_copy_state = True`` (QAT quantizers: an averaged
    power-of-2 exponent would no longer be an integer, so the EMA takes the trained model's exactly). If the model's
    structure changes after the EMA was made (modules added or removed, or a buffer changes shape, as
    when a model is prepared for QAT), ``update`` rebuilds the EMA copy from the model, keeping the
    averaged values of every entry that still matches, and logs a warning.

    Example::

        ema = ModelEMA(model)
        ...; optimizer.step(); ema.update(model)
        ema.update_attr(model)  # before saving: copy yaml, nc, names, stride ...
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = self._frozen_copy(model)
        self.copied = _copied_state_keys(self.ema)
        self._host_twins: tuple = (None, [])  # (id of the source model, [(ema module, model module)])
        self.updates = updates
        self.decay_max = decay
        self.tau = tau

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        ema = deepcopy(de_parallel(model)).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    def decay(self, updates: int) -> float:
        """Mixing weight kept from the EMA after ``updates`` updates."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Mix the model's current state into the EMA: ``ema = d * ema + (1 - d) * model``."""
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        esd = self.ema.state_dict()
        if esd.keys() != msd.keys() or any(v.shape != msd[k].shape for k, v in esd.items()):
            self._rebuild(model, esd)
            esd = self.ema.state_dict()
        averaged, sources, copies, originals = [], [], [], []
        for k, v in esd.items():
            m = msd[k].detach()
            if v.dtype.is_floating_point and k not in self.copied:
                averaged.append(v)
                sources.append(m if (m.device, m.dtype) == (v.device, v.dtype) else m.to(v.device, v.dtype))
            else:
                copies.append(v)
                originals.append(m if m.device == v.device and m.dtype == v.dtype else m.to(v.device, v.dtype))
        # One multi-tensor kernel per operation instead of two per entry (hundreds of launches a step on
        # a GPU); v * d, then + (1 - d) * m as two roundings, exactly as upstream's per-entry loop rounds.
        if averaged:
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, torch._foreach_mul(sources, 1 - d))
        if copies:
            torch._foreach_copy_(copies, originals)
        for ema_module, module in self._twins_with_host_state(de_parallel(model)):
            ema_module.copy_host_state(module)

    def _twins_with_host_state(self, source: nn.Module) -> list:
        """(EMA module, model module) pairs of modules that keep Python copies of their buffers (QAT
        quantizers: ``copy_host_state``), found once per source model: after the buffer copy each takes
        its twin's copies, without a device read."""
        if self._host_twins[0] != id(source):
            twins = dict(source.named_modules(remove_duplicate=False))
            pairs = [(m, twins[n]) for n, m in self.ema.named_modules(remove_duplicate=False)
                     if hasattr(m, "copy_host_state") and n in twins]
            self._host_twins = (id(source), pairs)
        return self._host_twins[1]

    def _rebuild(self, model: nn.Module, old: dict) -> None:
        """Re-copy the model's structure, keeping averaged values for entries that still match."""
        fresh = self._frozen_copy(model)
        kept = intersect_dicts(old, fresh.state_dict())
        LOGGER.warning(f"ModelEMA: model structure changed; EMA rebuilt from the model, "
                       f"{len(kept)}/{len(fresh.state_dict())} averaged entries kept")
        fresh.load_state_dict(kept, strict=False)
        self.ema = fresh
        self.copied = _copied_state_keys(fresh)
        self._host_twins = (None, [])

    def update_attr(self, model: nn.Module, include: Iterable[str] = ("yaml", "nc", "hyp", "names", "stride"),
                    exclude: Iterable[str] = ()) -> None:
        """Copy plain attributes (not parameters) named in ``include`` from the model to the EMA."""
        source = de_parallel(model)
        include, exclude = tuple(include), tuple(exclude)
        for k, v in vars(source).items():
            if (include and k not in include) or k.startswith("_") or k in exclude:
                continue
            setattr(self.ema, k, v)


def describe_device(device: torch.device) -> str:
    """The device in words for benchmark tables: the GPU's name, or the CPU's with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"


# glibc mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_KEPT_FREED_MEMORY = False


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU device with glibc, stop malloc from handing freed memory back to the system between training
    steps (tensors up to 32 MB come from the heap, and the heap is not trimmed). Otherwise every step
    faults the same pages in again: about 27,000 page faults (~50 ms) per observing QAT step of yolov5n
    at 320, batch 8, on 2 cores (notes/qat_speed.md). Returns whether the setting is in effect (once per
    process; no-op on GPU devices and other C libraries). Memory use stays at the step's peak, which
    training reaches every step anyway."""
    global _KEPT_FREED_MEMORY
    if device.type != "cpu" or platform.system() != "Linux":
        return _KEPT_FREED_MEMORY
    if not _KEPT_FREED_MEMORY:
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            _KEPT_FREED_MEMORY = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
        except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator as it is
            _KEPT_FREED_MEMORY = False
    return _KEPT_FREED_MEMORY


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def use_channels_last(choice: str, device: torch.device) -> bool:
    """Whether to train in channels_last: 'auto' picks it on CUDA, where cuDNN's NHWC convolutions run
    about twice as fast under AMP; on CPU the default NCHW layout is kept."""
    if choice not in MEMORY_FORMATS:
        raise ValueError(f"--memory-format {choice!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    return choice == "channels_last" or (choice == "auto" and device.type == "cuda")


def _copied_state_keys(model: nn.Module) -> frozenset:
    """state_dict keys of modules that ask to be copied, not averaged, by the EMA."""
    keys = set()
    for name, module in model.named_modules():
        if getattr(module, "ema_copy_state", False):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict())
    return frozenset(keys)


def smart_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.9,
                    decay: float = 1e-5, skip: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """Optimizer with upstream's three parameter groups, in upstream's order.

    group 0: biases (no decay; the warm-up gives this group ``warmup_bias_lr``),
    group 1: weights of conv/linear layers (``weight_decay=decay``),
    group 2: weights of normalization layers (no decay).
    Parameters with other names (e.g. learnable quantizer scales) join the no-decay group 2; upstream
    models have none, so their group sizes are unchanged. ``name``: SGD (Nesterov), Adam, AdamW, RMSProp.
    Parameters named in ``skip`` are left out (another optimizer trains them).
    """
    biases, weights, no_decay = [], [], []
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if p_name in skip:
                continue
            if p_name == "bias":
                biases.append(p)
            elif p_name == "weight" and not isinstance(module, NORM_LAYERS):
                weights.append(p)
            else:
                no_decay.append(p)
    params = biases + weights + no_decay
    # Fused kernels (one launch for all tensors, and no host read of GradScaler's inf flag) where torch
    # has them; SGD's fused update is bit-identical to the foreach one.
    fused = name in FUSED_OPTIMIZERS and bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    optimizer = _make_optimizer(biases, name, lr, momentum, fused)
    optimizer.add_param_group({"params": weights, "weight_decay": decay})
    optimizer.add_param_group({"params": no_decay, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {type(optimizer).__name__}(lr={lr}) with parameter groups "
                f"{len(no_decay)} weight(decay=0.0), {len(weights)} weight(decay={decay}), {len(biases)} bias")
    return optimizer


FUSED_OPTIMIZERS = ("SGD", "Adam", "AdamW")


def _make_optimizer(params: list, name: str, lr: float, momentum: float, fused: bool) -> torch.optim.Optimizer:
    kernel = {"fused": True} if fused else {"foreach": True}
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, **kernel)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), **kernel)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=0.0, **kernel)
    if name == "RMSProp":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, foreach=True)
    raise ValueError(f"--optimizer {name!r}: unknown, choose SGD, Adam, AdamW or RMSProp")


@dataclass(frozen=True)
class one_cycle:  # noqa: N801 - a function-like name, as upstream calls it
    """Cosine ramp from ``y1`` at step 0 to ``y2`` at ``steps``; a picklable LambdaLR factor.

    Example: ``LambdaLR(opt, lr_lambda=one_cycle(1, hyp['lrf'], epochs))``.
    """

    y1: float = 0.0
    y2: float = 1.0
    steps: int = 100

    def __call__(self, x: float) -> float:
        return ((1 - math.cos(x * math.pi / self.steps)) / 2) * (self.y2 - self.y1) + self.y1


@dataclass(frozen=True)
class linear_lr:  # noqa: N801 - used like upstream's lambda
    """Linear decay of the LR factor from 1 at epoch 0 to ``lrf`` at ``epochs``; picklable."""

    lrf: float
    epochs: int

    def __call__(self, x: float) -> float:
        return (1 - x / self.epochs) * (1.0 - self.lrf) + self.lrf


class EarlyStopping:
    """Stop training when fitness has not improved for ``patience`` epochs (0 or None: never stop)."""

    def __init__(self, patience: int | None = 30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False  # True on the last epoch before a stop would trigger

    def __call__(self, epoch: int, fitness: float) -> bool:
        """Record this epoch's fitness; return True when training should stop."""
        if fitness >= self.best_fitness:  # '>=' lets an all-zero early phase keep moving best_epoch
            self.best_epoch, self.best_fitness = epoch, fitness
        waited = epoch - self.best_epoch
        self.possible_stop = waited >= self.patience - 1
        stop = waited >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early: no improvement in the last {self.patience} epochs; "
                        f"best results at epoch {self.best_epoch} (fitness {self.best_fitness:.5f}). "
                        f"Use --patience 0 to disable early stopping.")
        return stop
