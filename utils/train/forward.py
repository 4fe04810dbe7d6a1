"""What a training step calls for its forward pass.

For QAT that is the prepared graph without the concat re-quantizations that are identities once observers
are frozen (quant.frozen_view: the same values and gradients, about a fifth fewer activation values
fake-quantized; while observers run, the joined tensors are not counted a second time). Under DDP the
wrapper holds that view, so every rank trains the same graph as one process does: the view shares every
parameter and buffer with the prepared model, which is what the optimizer, EMA and checkpoints use.
With ``--compile`` the forward is compiled once, except that steps whose histogram observers run stay
eager; EMA, checkpoints and validation keep using the plain module, so nothing saved depends on the compiler."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from utils.log import colorstr
from utils.qat import is_prepared

LOGGER = logging.getLogger(__name__)


class TrainingForward:
    """``pick(observers_frozen)`` returns the module to call. ``model`` is the bare model; ``wrap`` puts the
    module a step runs (the model, or a prepared model's frozen view) in DDP's wrapper, or returns it."""

    def __init__(self, model: nn.Module, compile: bool, wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.model, self.compile = model, compile
        self.frozen_view: nn.Module | None = None
        if is_prepared(model):
            from quant.frozen_view import frozen_view

            self.frozen_view = frozen_view(model)
        self.wrapped = wrap(self.frozen_view if self.frozen_view is not None else model)
        self._compiled: nn.Module | None = None

    def train(self) -> None:
        """Training mode for the model and for the wrapper around what a step runs."""
        self.model.train()
        self.wrapped.train()

    def pick(self, observers_frozen: bool = False) -> nn.Module:
        if not observers_frozen and self.compile and _observes_on_host(self.model):
            # histogram observers count on the host between graphs: a compiled observing step breaks at each
            # of them and measured about 1.75x the eager one (README, 'What QAT costs per training step')
            return self.wrapped
        return self._compiled_version() if self.compile else self.wrapped

    def _compiled_version(self) -> nn.Module:
        """One torch.compile wrapper; a QAT phase change recompiles it once (the quantizers' flags are Python
        state that dynamo guards on)."""
        if self._compiled is None:
            LOGGER.info(colorstr("compile: ") + "torch.compile on the training forward; the first steps compile")
            self._compiled = torch.compile(self.wrapped)
        return self._compiled


def _observes_on_host(module: nn.Module) -> bool:
    """True while a fake quantizer of ``module`` observes with a host-side (histogram) observer."""
    from quant.schedule import iter_quantizers

    return any(q.observes_on_host() for _, q in iter_quantizers(module))


def ddp_wrapper(dist, cuda: bool) -> Callable[[nn.Module], nn.Module]:
    """A function putting a module in DistributedDataParallel under DDP (``dist.rank != -1``), else the
    identity."""
    if dist.rank == -1:
        return lambda module: module
    from torch.nn.parallel import DistributedDataParallel as DDP

    def wrap(module: nn.Module) -> nn.Module:
        ids = [dist.local_rank] if cuda else None
        return DDP(module, device_ids=ids, output_device=dist.local_rank if cuda else None)

    return wrap
