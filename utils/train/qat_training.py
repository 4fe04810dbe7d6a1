"""What a QAT run adds to training set-up, for utils.train.trainer: the prepared (fake-quantized) model, the
optimizer of trained power-of-2 thresholds and the distillation teacher."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from utils.checkpoint import CheckpointRecord
from utils.log import colorstr
from utils.train.config import TrainConfig

LOGGER = logging.getLogger(__name__)

DEFAULT_LR_THRESHOLD = 0.01  # hyp 'lr_threshold' when absent: Adam's step on log2 thresholds
DEFAULT_DISTILL_GAIN = 1.0  # hyp 'distill' when absent


def prepare_for_training(model: nn.Module, record: CheckpointRecord | None, cfg: TrainConfig, data: dict,
                         imgsz: int, device: torch.device, rank: int, save_dir: Path | None) -> tuple[nn.Module, bool]:
    """(prepared model in train mode, calibrated): rebuilt from a QAT checkpoint, or prepared from float
    weights and, with ``cfg.qat_calib_images`` > 0, calibrated to the PTQ state before the first step.
    ``save_dir`` (the main process only) receives the plan."""
    from quant.schedule import iter_quantizers
    from utils.data.calibration import calibrate_on_training_images
    from utils.qat import prepare_qat_model, rebuild_qat_model

    if record is not None and record.quant is not None:
        LOGGER.info(f"QAT: continuing from the quantized checkpoint {cfg.weights}")
        return rebuild_qat_model(record, record.train_state, device).train(), True  # calibrated by its run
    graphs = save_dir / "graphs" if cfg.qat_graphs and save_dir is not None else None
    prepared = prepare_qat_model(model, imgsz, cfg.qat_config, graph_dir=graphs)
    n_calib = cfg.qat_calib_images
    if n_calib > 0:  # start from the PTQ state: every range calibrated before the first step
        calibrate_on_training_images(prepared, data, imgsz, n_calib, device, cfg.workers)
        if rank != -1:
            for _, q in iter_quantizers(prepared):
                q.sync_across_ranks()
    if save_dir is not None:
        (save_dir / "qat_plan.txt").write_text(prepared.plan.table() + "\n")
        LOGGER.info(colorstr("QAT: ") + f"prepared with {cfg.qat_config}; plan in {save_dir / 'qat_plan.txt'}")
    return prepared.train(), n_calib > 0


def threshold_optimizer_from_hyp(model: nn.Module, hyp: dict) -> torch.optim.Optimizer | None:
    """Adam for the trained power-of-2 thresholds (hyp 'lr_threshold'), None when the config trains none."""
    from quant.threshold import threshold_optimizer

    lr = float(hyp.get("lr_threshold", DEFAULT_LR_THRESHOLD))
    optimizer = threshold_optimizer(model, lr)
    if optimizer is not None:
        n = len(optimizer.param_groups[0]["params"])
        LOGGER.info(colorstr("QAT: ") + f"{n} trained thresholds, Adam(lr={lr:g}) once observers freeze")
    return optimizer


def distillation_from_options(cfg: TrainConfig, nc: int, hyp: dict, device: torch.device):
    """--qat-distill: the float teacher (the run's starting weights, kept in opt.yaml for --resume)."""
    from utils.train.distill import HeadDistillation, load_teacher

    teacher = load_teacher(cfg.qat_distill, cfg.cfg, nc, hyp, cfg.act, device)
    gain = float(hyp.get("distill", DEFAULT_DISTILL_GAIN))
    LOGGER.info(colorstr("QAT: ") + f"distillation from {cfg.qat_distill} (gain {gain:g})")
    return HeadDistillation(teacher, gain)
