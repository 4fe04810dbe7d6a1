"""The YOLOv5 v7.0 training loop as a sequence of named steps (set-up, epoch, step, end of epoch, finish).

``train.py`` parses flags and calls :class:`Trainer`; everything here can be driven from Python.
Beyond upstream: a non-finite guard (steps with a NaN/inf loss or gradient norm are skipped and
counted; too many in a row stop the run, keeping the last good checkpoint), SIGINT saves last.pt and
stops, and checkpoints carry random states so a resumed run ends with the same weights.

Example:
    >>> trainer = Trainer(TrainConfig.from_namespace(opt), device, save_dir, DistContext.from_env())
    >>> results = trainer.fit()
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from quant.threshold import is_threshold_parameter
from utils.checkpoint import CheckpointRecord
from utils.data.data_config import check_img_size
from utils.eval.evaluate import EvalOptions, result_tuple, validate
from utils.eval.metrics import fitness
from utils.eval.plots import plot_images, plot_results
from utils.eval.quant_report import log_report_paths, try_report_quantization
from utils.log import TQDM_BAR_FORMAT, colorstr
from utils.qat import load_model
from utils.torch_utils import EarlyStopping, ModelEMA, torch_distributed_zero_first, use_channels_last
from utils.train.autoanchor import check_anchors
from utils.train.callbacks import ResultsLogger
from utils.train.config import DistContext, TrainConfig
from utils.train.forward import TrainingForward, ddp_wrapper
from utils.train.guard import NonFiniteLossError, StepGuard, StopOnSigint
from utils.train.loss import ComputeLoss
from utils.train.qat_training import distillation_from_options, prepare_for_training, threshold_optimizer_from_hyp
from utils.train.saving import CheckpointFiles
from utils.train.setup import (build_model, describe_schedule, freeze_layers, get_rng_state, lr_lambda,
                               make_loaders, make_optimizer, prepare_data, random_rescale, resume_from,
                               scale_loss_gains, set_rng_state, strip_checkpoint, training_checkpoint,
                               warmup_iterations)

LOGGER = logging.getLogger(__name__)

MAX_GRAD_NORM = 10.0
NONFINITE_LIMIT = 10  # consecutive skipped steps before the run is declared diverged
PROGRESS_INTERVAL_S = 0.5  # the loss shown in the progress bar is read from the device at most this often


class Trainer:
    """One training run: ``cfg`` holds train.py's options, ``dist`` this process's DDP place (the
    default: no DDP); ``save_dir`` exists."""

    def __init__(self, cfg: TrainConfig, device: torch.device, save_dir: Path, dist: DistContext = DistContext(),
                 stop_after_epoch: int | None = None):
        self.cfg, self.device, self.save_dir, self.dist = cfg, device, Path(save_dir), dist
        self.stop_after_epoch = stop_after_epoch
        self.rank, self.local_rank, self.world_size = dist.rank, dist.local_rank, dist.world_size
        self.main = dist.main
        self.cuda = device.type == "cuda"
        self.amp = self.cuda
        self.amp_dtype = torch.float16  # QAT switches to bfloat16 (see _prepare_qat)
        self.qat = cfg.qat
        self.qat_calibrated = False  # QAT: ranges calibrated before the first step (PTQ state or QAT checkpoint)
        self.wdir = self.save_dir / "weights"
        self.files = CheckpointFiles(self.wdir, cfg.save_period, self.main)
        self.interrupted = False
        self.results: tuple = (0, 0, 0, 0, 0, 0, 0)
        self.epoch_speed: list[dict] = []  # per trained epoch: images, seconds (loader waits included)

    # ----------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        """Data, model, optimizer, scheduler, EMA, resume state, loaders, anchors and loss."""
        opt = self.cfg
        self.hyp = dict(opt.hyp)
        LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in self.hyp.items()))
        if self.main:
            self.wdir.mkdir(parents=True, exist_ok=True)
            (self.save_dir / "hyp.yaml").write_text(yaml.safe_dump(self.hyp, sort_keys=False))
            (self.save_dir / "opt.yaml").write_text(yaml.safe_dump(opt.to_dict(), sort_keys=False))
        with torch_distributed_zero_first(self.local_rank) if self.rank != -1 else nullcontext():
            self.data = prepare_data(opt.data)
        self.nc = 1 if opt.single_cls else int(self.data["nc"])
        names = self.data["names"]
        self.names = {0: "item"} if opt.single_cls and len(names) != 1 else dict(names)
        self.is_coco = str(self.data.get("val", "")).endswith("coco/val2017.txt")

        model, record = build_model(opt.weights, opt.cfg, self.nc, self.hyp, opt.act, opt.resume, self.device,
                                    qat=self.qat)
        self.gs = max(int(model.stride.max()), 32)
        self.imgsz = check_img_size(opt.imgsz, self.gs, floor=self.gs * 2)
        if opt.qat:
            model = self._prepare_qat(model, record)
        self.channels_last = use_channels_last(opt.memory_format, self.device)
        if self.channels_last:  # parameters keep their identity: the optimizer and EMA see NHWC tensors
            model = model.to(memory_format=torch.channels_last)
        freeze_layers(model, list(opt.freeze))
        self.optimizer, self.accumulate = make_optimizer(model, opt.optimizer, self.hyp, opt.batch_size)
        self.threshold_opt = threshold_optimizer_from_hyp(model, self.hyp) if self.qat else None
        self.distill = None
        if self.qat and opt.qat_distill:
            self.distill = distillation_from_options(opt, self.nc, self.hyp, self.device)
        self.lf = lr_lambda(opt.cos_lr, self.hyp["lrf"], opt.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)
        # hyp 'ema_decay' (ours; upstream's 0.9999 when absent): 0 validates the raw weights, as the
        # earlier QAT attempt did by switching EMA off
        self.ema = ModelEMA(model, decay=float(self.hyp.get("ema_decay", 0.9999))) if self.main else None
        self.best_fitness, self.start_epoch, self.train_state = 0.0, 0, {}
        if opt.resume:
            self.best_fitness, self.start_epoch, self.train_state = resume_from(
                record.raw, model, self.optimizer, self.ema, opt.weights, opt.epochs)
            self.accumulate = self.train_state.get("accumulate", self.accumulate)
            if self.threshold_opt is not None and record.raw.get("threshold_optimizer"):
                self.threshold_opt.load_state_dict(record.raw["threshold_optimizer"])
        del record
        if opt.sync_bn and self.rank != -1:
            if self.cuda:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(self.device)
                LOGGER.info("Using SyncBatchNorm()")
            else:  # torch's SyncBatchNorm runs on accelerators only
                LOGGER.warning("WARNING: --sync-bn needs CUDA; training with per-process BatchNorm on CPU")
        self._make_loaders(model)
        self.model = model  # the bare model; under DDP the wrapper holds what a step runs (self.forwards)
        # the gradient-norm clip covers the network's parameters; trained thresholds are Adam's (own scale)
        self.clip_params = [p for n, p in self.model.named_parameters() if not is_threshold_parameter(n)]
        self.forwards = TrainingForward(model, opt.compile, ddp_wrapper(self.dist, self.cuda))
        self.train_forward = self.forwards.pick()
        self._attach_attributes()

    def _prepare_qat(self, model: nn.Module, record: CheckpointRecord | None) -> nn.Module:
        """Swap in the fake-quantized model (utils.train.qat_training). AMP under QAT: autocast runs in bfloat16
        (float32's range, so no overflowing steps and no GradScaler); activations are fake-quantized in
        bfloat16 directly, which is exact for power-of-2 scales (see quant/fake_quant.py)."""
        plan_dir = self.save_dir if self.main else None
        prepared, self.qat_calibrated = prepare_for_training(
            model, record, self.cfg, self.data, self.imgsz, self.device, self.rank, plan_dir)
        self.amp_dtype = torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported() else torch.float16
        return prepared

    def _make_loaders(self, model: nn.Module) -> None:
        opt = self.cfg
        self.train_loader, self.dataset, self.val_loader = make_loaders(
            opt, self.data, self.hyp, self.imgsz, self.gs, self.nc, self.dist)
        if self.main and not opt.resume:
            if self.qat and not opt.noautoanchor:
                # the head was trained (and calibrated) for its anchors: new ones would undo that
                LOGGER.info(colorstr("AutoAnchor: ") + "skipped for QAT: the model keeps the anchors it was trained with")
            elif not opt.noautoanchor:
                check_anchors(self.dataset, model=model, thr=self.hyp["anchor_t"], imgsz=self.imgsz)
            model.half().float()  # pre-reduce anchor precision, as upstream

    def _attach_attributes(self) -> None:
        m = self.model
        nl = m.model[-1].nl
        m.hyp = scale_loss_gains(self.hyp, nl, self.nc, self.imgsz, self.cfg.label_smoothing)
        m.nc, m.names = self.nc, self.names
        self.compute_loss = ComputeLoss(self.model)

    # ------------------------------------------------------------------------------------- loop
    def fit(self) -> tuple:
        """Train from ``start_epoch`` to ``opt.epochs``; returns the final validation results."""
        opt = self.cfg
        self.nb = len(self.train_loader)
        self.nw = warmup_iterations(self.hyp["warmup_epochs"], self.nb)
        self.last_opt_step = self.train_state.get("last_opt_step", -1)
        self.guard = StepGuard(NONFINITE_LIMIT, skipped=self.train_state.get("nonfinite_skipped", 0))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.qat_schedule = None
        if self.qat:
            from quant.schedule import QATSchedule, ScheduleState

            self.qat_schedule = ScheduleState(
                QATSchedule(opt.qat_observer_epochs, opt.qat_freeze_bn_epoch, calibrated_before=self.qat_calibrated,
                            observer_every=opt.qat_observer_every), self.nb)
        LOGGER.info(colorstr("schedule: ") + describe_schedule(opt, self.hyp, self.lf, self.nb, self.nw,
                                                              self.qat_schedule, self.threshold_opt, self.distill))
        self.stopper = EarlyStopping(patience=opt.patience)
        self.logger = ResultsLogger(self.save_dir) if self.main else None
        self.scheduler.last_epoch = self.start_epoch - 1
        if self.train_state.get("rng"):
            set_rng_state(self.train_state["rng"])
        gen = getattr(self.train_loader, "generator", None)
        if gen is not None and self.train_state.get("loader_rng") is not None:
            gen.set_state(self.train_state["loader_rng"])  # the resumed epoch sees the same order
        t0, epoch, finished = time.time(), self.start_epoch, False
        LOGGER.info(f"Image sizes {self.imgsz} train, {self.imgsz} val\n"
                    f"Using {self.train_loader.num_workers} dataloader workers\n"
                    f"Logging results to {colorstr('bold', str(self.save_dir))}\n"
                    f"Starting training for {opt.epochs} epochs...")
        with StopOnSigint(self, distributed=self.dist.distributed):
            try:
                for epoch in range(self.start_epoch, opt.epochs):
                    self._train_epoch(epoch)
                    if self.interrupted:
                        self.files.save_interrupted(lambda: self._checkpoint(epoch - 1), epoch)
                        break
                    stop = self._end_epoch(epoch)
                    if stop or epoch == self.stop_after_epoch:
                        finished = stop
                        break
                else:
                    finished = True
                if finished:
                    self.guard.check_progress()
            except NonFiniteLossError:
                self.files.keep_last_good(lambda: self._checkpoint(epoch - 1), epoch)
                raise
            finally:
                if self.logger is not None:
                    self.logger.close()
        if self.main and finished:
            LOGGER.info(f"\n{epoch - self.start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
            self._finish()
        return self.results

    def _train_epoch(self, epoch: int) -> None:
        self.forwards.train()
        self._seed_loader(epoch)
        self.mloss = torch.zeros(3, device=self.device)
        LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
        pbar = enumerate(self.train_loader)
        if self.main:
            pbar = tqdm(pbar, total=self.nb, bar_format=TQDM_BAR_FORMAT)
        self.optimizer.zero_grad()
        shown = 0.0  # when the progress bar's losses were last read from the device
        t0, images, first_batch_s = time.perf_counter(), 0, None
        for i, (imgs, targets, paths, _) in pbar:
            ni = i + self.nb * epoch
            if first_batch_s is None:  # the loader's pipeline fills at each epoch start: time it apart
                first_batch_s = time.perf_counter() - t0
            images += imgs.shape[0]
            imgs = imgs.to(self.device, non_blocking=True)
            # the loader's batches are channels_last already; an NCHW model gets NCHW (uint8: the cheap
            # place to permute), so the float path computes exactly as before
            imgs = imgs.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            imgs = imgs.float() / 255
            self._warmup(ni, epoch)
            if self.qat_schedule is not None:
                self._qat_step(epoch, i)
            if self.cfg.multi_scale:
                imgs = random_rescale(imgs, self.imgsz, self.gs)
            loss_items = self._step(imgs, targets, ni)
            if self.main:
                if loss_items is not None:
                    self.mloss = (self.mloss * i + loss_items) / (i + 1)  # stays on the device
                now = time.monotonic()
                if now - shown >= PROGRESS_INTERVAL_S or i == self.nb - 1:  # formatting reads the GPU: not every step
                    shown = now
                    mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
                    pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (
                        f"{epoch}/{self.cfg.epochs - 1}", mem, *self.mloss.tolist(), targets.shape[0], imgs.shape[-1]))
                if not self.cfg.noplots and ni < 3:
                    plot_images(imgs, targets, paths, self.save_dir / f"train_batch{ni}.jpg")
            if self.interrupted:
                break
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the epoch's time includes its queued GPU work
        seconds = time.perf_counter() - t0
        self.epoch_speed.append({"epoch": epoch, "images": images * self.world_size, "seconds": seconds,
                                 "first_batch_s": first_batch_s or 0.0})
        if self.main:
            LOGGER.info(f"epoch {epoch}: {images * self.world_size} training images in {seconds:.1f}s "
                        f"({images * self.world_size / max(seconds, 1e-9):.1f} images/s)")
        self.lr = [x["lr"] for x in self.optimizer.param_groups]
        if not self.interrupted:  # an interrupted epoch is repeated on resume, at the same LR
            self.scheduler.step()

    def _qat_step(self, epoch: int, i: int) -> None:
        """Apply the observer/BN schedule; under DDP, observers are reduced across ranks before they
        freeze so every rank keeps identical scales."""
        model = self.model
        was_in_window = self.qat_schedule.window
        if self.rank != -1 and was_in_window and not self.qat_schedule.schedule.in_observer_window(epoch, i, self.nb):
            from quant.schedule import iter_quantizers

            for _, q in iter_quantizers(model):
                q.sync_across_ranks()
        self.qat_schedule.step(model, epoch, i)
        self.train_forward = self.forwards.pick(observers_frozen=not self.qat_schedule.observers)

    def _seed_loader(self, epoch: int) -> None:
        """DDP shuffles by epoch; otherwise one generator runs through all epochs (upstream's order)."""
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _warmup(self, ni: int, epoch: int) -> None:
        """Ramp accumulation, LRs (biases down from warmup_bias_lr, others up from 0) and momentum."""
        if self.nw == 0 or ni > self.nw:
            return
        xi = [0, self.nw]
        self.accumulate = max(1, np.interp(ni, xi, [1, 64 / self.cfg.batch_size]).round())
        for j, x in enumerate(self.optimizer.param_groups):
            start = self.hyp["warmup_bias_lr"] if j == 0 else 0.0  # biases fall, other groups rise
            x["lr"] = np.interp(ni, xi, [start, x["initial_lr"] * self.lf(epoch)])
            if "momentum" in x:
                x["momentum"] = np.interp(ni, xi, [self.hyp["warmup_momentum"], self.hyp["momentum"]])

    def _step(self, imgs: torch.Tensor, targets: torch.Tensor, ni: int) -> torch.Tensor | None:
        """Forward, loss, backward; optimizer + EMA step every ``accumulate`` iterations (guarded)."""
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            pred = self.train_forward(imgs)
            loss, loss_items = self.compute_loss(pred, targets.to(self.device, non_blocking=True))
            if self.distill is not None:
                loss = loss + self.distill(imgs, pred)
            if self.rank != -1:
                loss *= self.world_size  # DDP averages gradients over ranks
        finite = bool(torch.isfinite(loss).all())
        if not finite and self.rank == -1:
            self.guard.skip("loss", ni)  # no backward: keep the accumulated gradients clean
            return None
        # Under DDP every rank must join the gradient all-reduce; a NaN then shows in the norm below.
        self.scaler.scale(loss).backward()
        if ni - self.last_opt_step >= self.accumulate:
            self._optimizer_step(ni)
        return loss_items if finite else None

    def _optimizer_step(self, ni: int) -> None:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.clip_params, max_norm=MAX_GRAD_NORM)
        thresholds = self._thresholds_training()
        if thresholds:
            self.scaler.unscale_(self.threshold_opt)
            norm = norm + torch.nn.utils.clip_grad_norm_(self.threshold_opt.param_groups[0]["params"], math.inf)
        if torch.isfinite(norm):
            self.scaler.step(self.optimizer)
            if thresholds:
                from quant.threshold import sync_exponents

                self.scaler.step(self.threshold_opt)
                sync_exponents(self.model)  # the exponents follow before EMA copies them
            self.guard.ok()
            if self.ema:
                self.ema.update(self.model)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.threshold_opt is not None:
            self.threshold_opt.zero_grad()
        self.last_opt_step = ni
        if not torch.isfinite(norm):
            self.guard.skip("gradient norm", ni)

    def _thresholds_training(self) -> bool:
        """Thresholds train once the observer window is over (while observing, the observer sets them)."""
        return self.threshold_opt is not None and not self.qat_schedule.window

    # ---------------------------------------------------------------------------- end of epoch
    def _end_epoch(self, epoch: int) -> bool:
        """Validate, log, save; returns True when early stopping says so (broadcast under DDP)."""
        stop = False
        if self.main:
            self.ema.update_attr(self.model, include=["yaml", "nc", "hyp", "names", "stride"])
            final_epoch = (epoch + 1 == self.cfg.epochs) or self.stopper.possible_stop
            if not self.cfg.noval or final_epoch:
                self.results, self.maps, _ = result_tuple(validate(
                    self.ema.ema, self.val_loader, self.data, self._eval_options(), compute_loss=self.compute_loss))
            fi = fitness(self.results)
            stop = self.stopper(epoch=epoch, fitness=fi)
            self.best_fitness = max(self.best_fitness, fi)
            self.logger.log_epoch(epoch, [*self.mloss.tolist(), *self.results, *self.lr])
            if not self.cfg.nosave or final_epoch:
                self.files.save_epoch(self._checkpoint(epoch), epoch, is_best=self.best_fitness == fi)
        if self.rank != -1:
            import torch.distributed as dist

            flag = [stop]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        return stop

    def _eval_options(self, iou_thres: float = 0.6) -> EvalOptions:
        """val.py's defaults; fp16 under float AMP only (a QAT model validates as it trains)."""
        return EvalOptions(iou_thres=iou_thres, single_cls=self.cfg.single_cls, half=self.amp and not self.qat)

    def _train_state(self) -> dict:
        """Loop bookkeeping and every random stream, so a resumed run continues bit for bit."""
        gen = getattr(self.train_loader, "generator", None)
        return {"last_opt_step": int(self.last_opt_step), "accumulate": float(self.accumulate),
                "nonfinite_skipped": int(self.guard.skipped), "rng": get_rng_state(),
                "loader_rng": gen.get_state() if gen is not None else None}

    def _checkpoint(self, epoch: int) -> dict:
        self.ema.update_attr(self.model, include=["yaml", "nc", "hyp", "names", "stride"])
        opt = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.cfg.to_dict().items()}
        return training_checkpoint(self.model, self.ema, self.optimizer, epoch, self.best_fitness, opt,
                                   self._train_state(), self.threshold_opt)

    # ---------------------------------------------------------------------------------- finish
    def _finish(self) -> None:
        """Strip checkpoints, plot results, validate best.pt with plots; QAT: write its quantization report."""
        last, best = self.files.last, self.files.best
        for f in (last, best):
            if f.exists():
                strip_checkpoint(f)
        report = []
        if best.exists():
            LOGGER.info(f"\nValidating {best}...")
            model, _ = load_model(best, device=self.device, fuse=True)
            options = self._eval_options(iou_thres=0.65 if self.is_coco else 0.60)
            self.results, _, _ = result_tuple(validate(
                model, self.val_loader, self.data, options, compute_loss=self.compute_loss, save_dir=self.save_dir,
                plots=not self.cfg.noplots, per_class=True))
            if self.qat:  # one validation batch: a few seconds; a failure only warns
                report = try_report_quantization(model, self.val_loader, self.device, self.save_dir,
                                                 title=f"{best}, QAT")
        if not self.cfg.noplots and (self.save_dir / "results.csv").exists():
            plot_results(self.save_dir / "results.csv")
        LOGGER.info(f"Results saved to {colorstr('bold', str(self.save_dir))}")
        log_report_paths(report)
