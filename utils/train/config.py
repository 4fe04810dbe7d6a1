"""What a training run is told: a frozen, typed :class:`TrainConfig` (train.py's options) and a
:class:`DistContext` (this process's place in a DDP run). ``train.py`` builds both once; the trainer
and the data loaders take them as arguments and read neither flags nor environment variables.

Example:
    >>> cfg = TrainConfig.from_namespace(opt)        # opt: train.py's parsed and checked options
    >>> Trainer(cfg, device, Path(cfg.save_dir), DistContext.from_env())
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

__all__ = ["DistContext", "TrainConfig"]


@dataclass(frozen=True)
class DistContext:
    """Global rank, local rank and world size; (-1, -1, 1) outside DDP."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """What torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE); call it once, in the script."""
        return cls(int(os.getenv("RANK", -1)), int(os.getenv("LOCAL_RANK", -1)), int(os.getenv("WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.rank != -1

    @property
    def main(self) -> bool:
        """True on the process that validates, logs and saves (rank 0, or the only one)."""
        return self.rank in (-1, 0)


@dataclass(frozen=True)
class TrainConfig:
    """train.py's options after parsing and checking (``hyp`` is the loaded dict, ``freeze`` ints).

    Field names are the flags' (``--batch-size`` -> ``batch_size``); ``to_dict`` gives back exactly
    the mapping it was built from (what opt.yaml and checkpoints store), unknown keys of an older
    run's options included.
    """

    weights: str = ""
    cfg: str = ""
    data: str = ""
    hyp: dict = field(default_factory=dict)
    epochs: int = 100
    batch_size: int = 16
    imgsz: int = 640
    rect: bool = False
    resume: Union[bool, str] = False
    nosave: bool = False
    noval: bool = False
    noautoanchor: bool = False
    noplots: bool = False
    evolve: Optional[int] = None
    cache: Optional[str] = None
    image_weights: bool = False
    device: str = ""
    multi_scale: bool = False
    single_cls: bool = False
    optimizer: str = "SGD"
    sync_bn: bool = False
    workers: int = 8
    project: str = "runs/train"
    name: str = "exp"
    exist_ok: bool = False
    quad: bool = False
    cos_lr: bool = False
    label_smoothing: float = 0.0
    patience: int = 100
    freeze: tuple = (0,)
    save_period: int = -1
    seed: int = 0
    local_rank: int = -1
    act: Optional[str] = None
    qat: bool = False
    qat_config: str = ""
    qat_observer_epochs: float = 1.0
    qat_observer_every: int = 8
    qat_calib_images: int = 512
    qat_freeze_bn_epoch: int = 2
    qat_graphs: bool = False
    qat_distill: str = ""  # the float teacher's .pt ('' = no distillation)
    memory_format: str = "auto"
    compile: bool = False
    deterministic: bool = False
    save_dir: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know
    key_order: tuple = field(default=(), repr=False)

    @classmethod
    def from_namespace(cls, opt: Any) -> "TrainConfig":
        """From an argparse namespace (or a dict) of train.py's options."""
        values = dict(vars(opt) if not isinstance(opt, Mapping) else opt)
        known = {f.name for f in fields(cls)} - {"extra", "key_order"}
        kwargs = {k: v for k, v in values.items() if k in known}
        if "freeze" in kwargs:
            kwargs["freeze"] = tuple(int(x) for x in kwargs["freeze"])
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(**kwargs, extra=extra, key_order=tuple(values))

    def to_dict(self) -> dict[str, Any]:
        """The options as the namespace held them, in the same order (``freeze`` a list again)."""
        def value(key: str) -> Any:
            if key in self.extra:
                return self.extra[key]
            v = getattr(self, key)
            return list(v) if key == "freeze" else v

        order = self.key_order or tuple(f.name for f in fields(self) if f.name not in ("extra", "key_order"))
        return {k: value(k) for k in order}
