"""What a training step calls for its forward pass: the model (its DDP wrapper under DDP) or, for QAT in a
single process, the prepared graph without the concat re-quantizations that are identities once observers
are frozen (quant.frozen_view: then the same values and gradients, about a fifth fewer activation values
fake-quantized; while observers run, the joined tensors are not counted a second time). DDP's wrapper has
to run every forward, so under DDP the full graph stays, and its observed steps also count the joined
tensors, which changed no exponent where measured (notes/qat_speed.md, tenth round).
With ``--compile`` each of them is compiled once, except that steps whose histogram observers run stay
eager; EMA, checkpoints and validation keep using the plain module, so nothing saved depends on the compiler."""
from __future__ import annotations

import logging

import torch
from torch import nn

from utils.log import colorstr
from utils.qat import is_prepared
from utils.torch_utils import de_parallel

LOGGER = logging.getLogger(__name__)


class TrainingForward:
    """``pick(observers_frozen)`` returns the module to call; ``model`` is what training wraps (DDP or not)."""

    def __init__(self, model: nn.Module, compile: bool, single_process: bool):
        self.model, self.compile, self.single_process = model, compile, single_process
        self.frozen_view: nn.Module | None = None
        self._compiled: dict[int, nn.Module] = {}

    def pick(self, observers_frozen: bool = False) -> nn.Module:
        forward = self.model
        if self.single_process and is_prepared(forward):
            if self.frozen_view is None:
                from quant.frozen_view import frozen_view

                self.frozen_view = frozen_view(de_parallel(self.model))
            forward = self.frozen_view
        if not observers_frozen and self.compile and _observes_on_host(forward):
            # histogram observers count on the host between graphs: a compiled observing step breaks at each
            # of them and measured about 1.75x the eager one (README, 'What QAT costs per training step')
            return forward
        return self._compiled_version(forward) if self.compile else forward

    def _compiled_version(self, module: nn.Module) -> nn.Module:
        """One torch.compile wrapper per module; a QAT phase change recompiles it once (the quantizers'
        flags are Python state that dynamo guards on)."""
        compiled = self._compiled.get(id(module))
        if compiled is None:
            if not self._compiled:
                LOGGER.info(colorstr("compile: ") + "torch.compile on the training forward; the first steps compile")
            compiled = self._compiled[id(module)] = torch.compile(module)
        return compiled


def _observes_on_host(module: nn.Module) -> bool:
    """True while a fake quantizer of ``module`` observes with a host-side (histogram) observer."""
    from quant.schedule import iter_quantizers

    return any(q.observes_on_host() for _, q in iter_quantizers(module))


def wrap_ddp(model: nn.Module, dist, cuda: bool) -> nn.Module:
    """The model in DistributedDataParallel under DDP (``dist.rank != -1``), else itself."""
    if dist.rank == -1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.local_rank] if cuda else None
    return DDP(model, device_ids=ids, output_device=dist.local_rank if cuda else None)
