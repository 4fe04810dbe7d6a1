"""Building blocks of a training run, as YOLOv5 v7.0's train.py sets them up: model from weights or
yaml, frozen layers, optimizer with nominal-batch accumulation, LR lambda, loss gains, random-state
capture for exact resumes, and our plain-data training checkpoints.
"""
from __future__ import annotations

import logging
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.yolo import DetectionModel
from quant.threshold import THRESHOLD_PARAM
from utils.checkpoint import (CheckpointError, CheckpointRecord, make_checkpoint, read_checkpoint, save_checkpoint,
                              transfer_state_dict)
from utils.config_checks import check_hyp_values, read_yaml
from utils.data.data_config import DataConfigError, load_data_config
from utils.data.dataset import create_dataloader
from utils.log import colorstr
from utils.torch_utils import de_parallel, linear_lr, one_cycle, smart_optimizer, torch_distributed_zero_first

LOGGER = logging.getLogger(__name__)

NOMINAL_BATCH = 64  # upstream accumulates gradients up to this batch size
TRAIN_ONLY_KEYS = ("optimizer", "train_state_dict", "train_state", "ema_state_dict", "threshold_optimizer")
# every key of data/hyps/hyp.scratch-low.yaml; the loop, loss and augmentations read them all
REQUIRED_HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum",
                     "warmup_bias_lr", "box", "cls", "cls_pw", "obj", "obj_pw", "iou_t", "anchor_t",
                     "fl_gamma", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                     "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste")
# upstream's commented-out anchors; set by the trainer; ours: EMA decay (0 = off), and the QAT options
# utils.train.qat_training reads (trained thresholds' Adam step, distillation gain; data/hyps/hyp.qat.yaml)
OPTIONAL_HYP_KEYS = ("anchors", "label_smoothing", "ema_decay", "lr_threshold", "distill")


def check_hyp(hyp: Any, source: str | Path = "hyp") -> dict:
    """Validate a hyperparameter dict: a missing required key or a value of the wrong type or range is an
    error, an unknown key a warning.

    Raises ValueError in one line naming ``source`` and the key(s) (and the allowed values); returns ``hyp``.
    """
    if not isinstance(hyp, dict):
        raise ValueError(f"{source}: hyperparameters must be a mapping of name: value, got {type(hyp).__name__}")
    missing = [k for k in REQUIRED_HYP_KEYS if k not in hyp]
    if missing:
        raise ValueError(f"{source}: missing required hyperparameters {missing} "
                         f"(see data/hyps/hyp.scratch-low.yaml)")
    check_hyp_values(hyp, source)  # types and ranges, e.g. `lr0: abc` names the file and the key
    unknown = [k for k in hyp if k not in REQUIRED_HYP_KEYS and k not in OPTIONAL_HYP_KEYS]
    if unknown:  # probably a typo: upstream would silently ignore it, we say so once
        LOGGER.warning(f"WARNING: {source}: unknown hyperparameters {unknown} are ignored")
    return hyp


def prepare_data(data: str | Path | dict) -> dict:
    """Load the dataset yaml for training (a 'train' split is required), generating the synthetic
    dataset first when the yaml asks for it."""
    if not isinstance(data, dict) and Path(data).is_file():
        raw = read_yaml(data, "dataset")
        params = raw.get("synthetic") if isinstance(raw, dict) else None
        if isinstance(params, dict):
            from utils.data.synthetic import ensure_synthetic_dataset

            root = Path(str(raw.get("path") or "")).expanduser()
            root = root if root.is_absolute() else (Path(data).resolve().parent / root).resolve()
            ensure_synthetic_dataset(root, **params)
    cfg = load_data_config(data)
    if not cfg.get("train"):
        raise DataConfigError(f"{cfg['yaml_file'] or 'dataset dict'}: 'train:' field missing or empty "
                              "(training needs a folder, an images .txt list or a list of those)")
    return cfg


def build_model(weights: str | Path | None, cfg: str | Path | None, nc: int, hyp: dict, act: str | None,
                resume: bool, device: torch.device, qat: bool | None = None) -> tuple[DetectionModel, CheckpointRecord | None]:
    """The model to train: from ``weights`` (transferring what fits) or from the ``cfg`` yaml.

    Like upstream, training starts from the raw (non-EMA) weights when a checkpoint has them.
    Returns the model and the checkpoint record (None when built from a yaml only). ``qat`` False
    refuses a QAT checkpoint: training it as a float model would silently drop its quantization.
    """
    anchors = hyp.get("anchors")
    if weights:
        record = read_checkpoint(weights)
        if qat is False and record.quant is not None:
            raise ValueError(f"{weights}: is a QAT (power-of-2 INT8) checkpoint; add --qat to continue "
                             "quantization-aware training from it (without --qat its quantization would be dropped)")
        model = DetectionModel(cfg or record.yaml, ch=3, nc=nc, anchors=anchors, act=act)
        exclude = ("anchor",) if (cfg or anchors) and not resume else ()
        n = transfer_state_dict(model, record.train_state, exclude=exclude)
        LOGGER.info(f"Transferred {n}/{len(model.state_dict())} items from {weights}")
        return model.to(device), record
    if not cfg:
        raise ValueError("train: give --weights (a .pt file) or --cfg (a model yaml), e.g. --cfg yolov5n.yaml")
    return DetectionModel(cfg, ch=3, nc=nc, anchors=anchors, act=act).to(device), None


def freeze_layers(model: nn.Module, freeze: list[int]) -> list[str]:
    """Stop gradients of layers ``model.{i}.``: one number n freezes the first n, several name them."""
    prefixes = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    frozen = []
    for name, p in model.named_parameters():
        p.requires_grad = True
        if any(x in name for x in prefixes):
            p.requires_grad = False
            frozen.append(name)
    if frozen and len(frozen) == len(list(model.parameters())):  # backward would fail with a raw RuntimeError
        raise ValueError(f"--freeze {' '.join(map(str, freeze))}: freezes every layer of the model "
                         f"({len(getattr(model, 'model', []))} layers), nothing would train; freeze fewer layers")
    if frozen:
        LOGGER.info(f"freezing {len(frozen)} parameters in {len(prefixes)} layers")
    return frozen


def make_optimizer(model: nn.Module, name: str, hyp: dict, batch_size: int) -> tuple[torch.optim.Optimizer, int]:
    """Optimizer and accumulation steps; weight decay scales with the effective batch (edits ``hyp``)."""
    accumulate = max(round(NOMINAL_BATCH / batch_size), 1)
    hyp["weight_decay"] *= batch_size * accumulate / NOMINAL_BATCH
    # trained quantizer thresholds have an optimizer of their own (quant.threshold)
    return smart_optimizer(model, name, hyp["lr0"], hyp["momentum"], hyp["weight_decay"],
                           skip=(THRESHOLD_PARAM,)), accumulate


def warmup_iterations(warmup_epochs: float, batches_per_epoch: int) -> int:
    """Warmup length in optimizer iterations: upstream's floor of 100 when there is a warmup at all,
    none when the hyp says 0 (a short QAT run must train at the rate it asks for from step 0)."""
    if warmup_epochs <= 0:
        return 0
    return max(round(warmup_epochs * batches_per_epoch), 100)


def lr_lambda(cos_lr: bool, lrf: float, epochs: int):
    """The per-epoch LR factor: cosine one-cycle or linear decay to ``lrf``."""
    return one_cycle(1, lrf, epochs) if cos_lr else linear_lr(lrf, epochs)


def describe_schedule(cfg: Any, hyp: dict, lf, nb: int, nw: int, qat_schedule: Any = None,
                      threshold_opt: Any = None, distill: Any = None) -> str:
    """The effective schedule in one line: what the run will really do, printed before it starts
    (``lf`` the LR lambda, ``nb`` batches per epoch, ``nw`` warm-up iterations; the QAT parts when given)."""
    lr0 = float(hyp["lr0"])
    text = (f"lr {lr0:g} -> {lr0 * lf(cfg.epochs - 1):g} ({'cosine' if cfg.cos_lr else 'linear'} over "
            f"{cfg.epochs} epochs of {nb} batches), "
            + (f"warmup {nw} iterations" if nw else "no warmup (lr0 from the first step)"))
    if qat_schedule is not None:
        sched = qat_schedule.schedule
        obs, stride = sched.observer_batches(nb), sched.observer_stride(nb)
        window = f"calibrate for {obs} batches" + (f" (one in {stride} observed)" if stride > 1 else "")
        text += (f"; QAT observers {window if obs else 'frozen from the start'}"
                 f", BN statistics " + (f"frozen from epoch {sched.freeze_bn_epoch}" if sched.freeze_bn_epoch >= 0
                                        else "never frozen"))
        if threshold_opt is not None:
            text += f", thresholds trained from batch {obs} (Adam lr {threshold_opt.defaults['lr']:g})"
        if distill is not None:
            text += f", distillation gain {distill.gain:g}"
    return text


def make_loaders(cfg: Any, data: dict, hyp: dict, imgsz: int, gs: int, nc: int, dist: Any) -> tuple:
    """(train loader, its dataset, val loader or None): the validation loader is built on the main
    process only; a label class beyond ``nc`` is refused naming the dataset."""
    rank, batch = dist.rank, cfg.batch_size // dist.world_size
    with torch_distributed_zero_first(dist.local_rank) if rank != -1 else nullcontext():
        train_loader, dataset = create_dataloader(
            data["train"], imgsz, batch, gs, cfg.single_cls, hyp=hyp, augment=True, cache=cfg.cache, rect=cfg.rect,
            rank=dist.local_rank, workers=cfg.workers, shuffle=True, prefix=colorstr("train: "), seed=cfg.seed,
            global_rank=rank)
    labels = np.concatenate(dataset.labels, 0)
    if len(labels) and int(labels[:, 0].max()) >= nc:
        raise ValueError(f"{cfg.data}: label class {int(labels[:, 0].max())} exceeds nc={nc}; "
                         f"possible class labels are 0-{nc - 1}")
    val_loader = None
    if dist.main:
        val_loader = create_dataloader(
            data["val"], imgsz, batch * 2, gs, cfg.single_cls, hyp=hyp, cache=None if cfg.noval else cfg.cache,
            rect=True, rank=-1, workers=cfg.workers * 2, pad=0.5, prefix=colorstr("val: "), global_rank=rank)[0]
    return train_loader, dataset, val_loader


def random_rescale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """--multi-scale: the batch resized to a random multiple of the stride ``gs`` in [0.5, 1.5] x imgsz."""
    sz = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = sz / max(imgs.shape[2:])
    if sf != 1:
        ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
        imgs = nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)
    return imgs


def scale_loss_gains(hyp: dict, nl: int, nc: int, imgsz: int, label_smoothing: float) -> dict:
    """Scale box/cls/obj gains to the number of levels, classes and image size (upstream rule)."""
    hyp = dict(hyp)
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = label_smoothing
    return hyp


def get_rng_state() -> dict:
    """torch, numpy and python random states as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def training_checkpoint(model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer, epoch: int,
                        best_fitness: float, opt: dict, train_state: dict,
                        threshold_optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Our checkpoint: EMA weights (float32) as 'state_dict', plus what an exact resume needs."""
    from utils.qat import is_prepared, qat_checkpoint_entry

    # a prepared (fake-quantized) model: record how to rebuild it
    quant = qat_checkpoint_entry(ema.ema) if is_prepared(ema.ema) else None
    ckpt = make_checkpoint(ema.ema, epoch=epoch, best_fitness=best_fitness, hyp=getattr(ema.ema, "hyp", None),
                           opt=opt, optimizer=optimizer.state_dict(), updates=ema.updates, quant=quant)
    ckpt["train_state_dict"] = {k: v.detach().cpu().clone() for k, v in de_parallel(model).state_dict().items()}
    ckpt["train_state"] = train_state
    if threshold_optimizer is not None:
        ckpt["threshold_optimizer"] = threshold_optimizer.state_dict()
    return ckpt


def strip_checkpoint(path: Path) -> None:
    """Drop optimizer and resume data from a finished run's checkpoint (as upstream strip_optimizer)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in TRAIN_ONLY_KEYS:
        ckpt.pop(key, None)
    ckpt.update(epoch=-1, optimizer=None)
    save_checkpoint(ckpt, path)
    LOGGER.info(f"Optimizer stripped from {path}, {path.stat().st_size / 1e6:.1f}MB")


def resume_from(ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any,
                weights: str | Path, epochs: int) -> tuple[float, int, dict]:
    """Load optimizer, EMA and bookkeeping; returns (best_fitness, start_epoch, train_state)."""
    start_epoch = int(ckpt.get("epoch", -1)) + 1
    if ckpt.get("optimizer") is None:
        raise CheckpointError(f"{weights}: training already finished (optimizer stripped), nothing to resume; "
                              "start a new run with --weights instead")
    if start_epoch >= epochs:
        raise CheckpointError(f"{weights}: training to {epochs} epochs is finished, nothing to resume")
    optimizer.load_state_dict(ckpt["optimizer"])
    ema.ema.load_state_dict(ckpt["state_dict"])
    ema.updates = int(ckpt.get("updates") or 0)
    LOGGER.info(f"Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs")
    return float(ckpt.get("best_fitness") or 0.0), start_epoch, dict(ckpt.get("train_state") or {})
