"""Training throughput in one run on one machine: data loader, float train step, QAT train step.

Usage:
    python -m bench.train_speed --cfg yolov5n.yaml --imgsz 320 --batch-size 8 --steps 10 --workers 2
    python -m bench.train_speed --cfg yolov5s.yaml --act relu --device 0 --json train_speed.json

Four numbers, printed side by side (and written as JSON with ``--json``):
1. loader: the training DataLoader (augment=True: mosaic, affine, HSV, flips; ``--hyp``, default
   hyp.scratch-low) iterated for ``--loader-batches`` batches after ``--warmup``, no model;
2. float step: a DetectionModel from ``--cfg`` on a device-resident random batch: forward,
   ComputeLoss, backward, gradient clipping and an SGD step, fp16 autocast + GradScaler on CUDA
   and the trainer's memory format (as utils.train.trainer does for float training);
3. QAT step: the same network prepared with utils.qat.prepare_qat_model, same batch, bfloat16
   autocast on CUDA (as the trainer does for QAT); observers calibrate during the first half of
   the timed steps and are frozen for the second half, and each phase is reported;
4. ratios: QAT/float step time per phase (the goal is <= 1.3 on a GPU) and loader images/s over
   float-training images/s (> 1: the loader keeps up with the GPU).

Every timed step ends with a device synchronisation, so the time is the step's, not the queue's.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

LOGGER = logging.getLogger("bench.train_speed")

DEFAULT_HYP = ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"
DEFAULT_DATA = ROOT / "data" / "synthetic.yaml"
TARGETS_PER_IMAGE = 8  # COCO train2017 averages about 7.3 boxes per image
MAX_GRAD_NORM = 10.0  # the trainer clips at this norm before every optimizer step


@dataclass
class Timing:
    """Per-batch wall times (seconds) of one measured stage."""

    name: str
    batch_size: int
    times: list[float] = field(default_factory=list)

    @property
    def mean_ms(self) -> float:
        return 1000 * statistics.fmean(self.times) if self.times else float("nan")

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times) if self.times else float("nan")

    @property
    def images_per_s(self) -> float:
        total = sum(self.times)
        return self.batch_size * len(self.times) / total if total > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "batch_size": self.batch_size, "batches": len(self.times),
                "mean_ms": self.mean_ms, "median_ms": self.median_ms, "images_per_s": self.images_per_s}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_hyp(hyp: str | Path | dict) -> dict:
    """Hyperparameters from a yaml path (or a dict, copied)."""
    if isinstance(hyp, dict):
        return dict(hyp)
    with open(hyp, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{hyp}: hyperparameter file is not a mapping")
    return data


def resolve_data(data: str | Path | None) -> tuple[Any, int]:
    """(train source, number of classes) of a dataset yaml; None means the synthetic shapes set,
    generated under <repo>/datasets/synthetic on first use."""
    from utils.train.trainer import prepare_data

    config = prepare_data(data or DEFAULT_DATA)
    return config["train"], int(config["nc"])


# ------------------------------------------------------------------------------------------- loader
def time_loader(source: Any, imgsz: int, batch_size: int, hyp: dict, batches: int, warmup: int,
                workers: int, cache: Optional[str] = None, stride: int = 32) -> tuple[Timing, float]:
    """Time the augmenting training loader; returns (per-batch timing, dataset set-up seconds).

    The loader is cycled when it has fewer than ``warmup + batches`` batches (its workers persist).
    Augmentation runs in the workers, so with ``workers`` > 0 this is their combined throughput.
    """
    from utils.data.dataset import create_dataloader

    t0 = time.perf_counter()
    loader, dataset = create_dataloader(source, imgsz, batch_size, stride, hyp=hyp, augment=True,
                                        cache=cache, workers=workers, shuffle=True, prefix="bench: ")
    setup_s = time.perf_counter() - t0
    if not dataset.mosaic:
        raise ValueError(f"{source}: the training dataset was built without mosaic; check the hyp file")
    timing = Timing(f"loader (mosaic, {loader.num_workers} workers)", batch_size)
    # Workers start together, so the first batches arrive in a burst; skip at least one per worker.
    warmup = max(warmup, loader.num_workers)
    it, seen = iter(loader), 0
    t = time.perf_counter()
    while len(timing.times) < batches:
        try:
            imgs = next(it)[0]
        except StopIteration:
            it = iter(loader)
            continue
        now = time.perf_counter()
        seen += 1
        if seen > warmup:  # the first batches include worker start-up
            timing.times.append(now - t)
            timing.batch_size = imgs.shape[0]
        t = now
    del it, loader
    return timing, setup_s


# ---------------------------------------------------------------------------------------- training
def random_batch(batch_size: int, imgsz: int, nc: int, device: torch.device,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (bs, 3, imgsz, imgsz) and targets (n, 6) [img, cls, x, y, w, h] on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.rand(batch_size, 3, imgsz, imgsz, generator=gen)
    n = batch_size * TARGETS_PER_IMAGE
    image_idx = torch.arange(batch_size).repeat_interleave(TARGETS_PER_IMAGE).float()
    cls = torch.randint(0, nc, (n,), generator=gen).float()
    wh = 0.02 + 0.38 * torch.rand(n, 2, generator=gen)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)  # boxes stay inside the image
    targets = torch.cat([image_idx[:, None], cls[:, None], xy, wh], 1)
    return imgs.to(device), targets.to(device)


def build_float_model(cfg: str | Path, nc: int, act: Optional[str], device: torch.device,
                      seed: int = 0) -> nn.Module:
    """A freshly initialised DetectionModel (same seed, same weights every call), in train mode."""
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    return DetectionModel(cfg, ch=3, nc=nc, act=act).to(device).train()


class TrainStep:
    """One optimisation step as utils.train.trainer takes it with accumulate == 1 (no warm-up LR ramp).
    ``forward``: what runs the model's forward, as the trainer's ``train_forward`` (default: ``model``)."""

    def __init__(self, model: nn.Module, hyp: dict, imgsz: int, batch_size: int, device: torch.device,
                 amp_dtype: torch.dtype, ema: bool = False, forward: Optional[Callable] = None):
        from utils.torch_utils import ModelEMA
        from utils.train.loss import ComputeLoss, find_detect
        from utils.train.setup import make_optimizer, scale_loss_gains

        head = find_detect(model)
        gains = scale_loss_gains(hyp, int(head.nl), int(head.nc), imgsz, 0.0)
        self.model, self.device = model, device
        self.forward = forward if forward is not None else model
        self.loss = ComputeLoss(model, hyp=gains)
        self.optimizer, _ = make_optimizer(model, "SGD", dict(hyp), batch_size)
        self.amp = device.type == "cuda"
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and amp_dtype == torch.float16)
        self.ema = ModelEMA(model) if ema else None

    def __call__(self, imgs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            loss, items = self.loss(self.forward(imgs), targets)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        return items


def time_steps(step: Callable, imgs: torch.Tensor, targets: torch.Tensor, n: int,
               device: torch.device, timing: Timing) -> Timing:
    """Run ``step`` n times, appending each synchronised step time to ``timing``."""
    for _ in range(n):
        synchronize(device)
        t = time.perf_counter()
        step(imgs, targets)
        synchronize(device)
        timing.times.append(time.perf_counter() - t)
    return timing


def _autocast(device: torch.device, qat: bool) -> tuple[torch.dtype, str]:
    """The trainer's autocast dtype (fp16 for float, bf16 for QAT where supported) and its label; CPU: fp32."""
    if device.type != "cuda":
        return torch.float32, "fp32"
    dtype = torch.bfloat16 if qat and torch.cuda.is_bf16_supported() else torch.float16
    return dtype, "bf16 AMP" if dtype == torch.bfloat16 else "fp16 AMP"


def bench_float(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], hyp: dict, steps: int,
                warmup: int, device: torch.device, ema: bool = False) -> Timing:
    """Time ``steps`` float training steps after ``warmup`` untimed ones."""
    dtype, name = _autocast(device, qat=False)
    imgs, targets = batch
    step = TrainStep(model, hyp, imgs.shape[-1], imgs.shape[0], device, dtype, ema)
    time_steps(step, imgs, targets, warmup, device, Timing("warm-up", imgs.shape[0]))
    return time_steps(step, imgs, targets, steps, device, Timing(f"float step ({name})", imgs.shape[0]))


def bench_qat(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], hyp: dict, steps: int,
              warmup: int, device: torch.device, config: Any = None, ema: bool = False,
              channels_last: bool = False) -> tuple[Timing, Timing]:
    """Prepare ``model`` for QAT, then time steps with observers on (first half) and frozen (rest), BN
    statistics from the batch in both (bench.qat_speed times the BN-frozen phase too).

    Warm-up steps run with observers on, so the frozen phase starts from calibrated ranges.
    """
    from quant.frozen_view import frozen_view
    from quant.schedule import set_observers
    from utils.qat import prepare_qat_model

    imgs, targets = batch
    prepared = prepare_qat_model(model, imgs.shape[-1], config).train()
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    dtype, name = _autocast(device, qat=True)
    step = TrainStep(prepared, hyp, imgs.shape[-1], imgs.shape[0], device, dtype, ema)
    set_observers(prepared, True)
    time_steps(step, imgs, targets, warmup, device, Timing("warm-up", imgs.shape[0]))
    observing = time_steps(step, imgs, targets, max(steps // 2, 1), device,
                           Timing(f"QAT step, observers on ({name})", imgs.shape[0]))
    set_observers(prepared, False)
    step.forward = frozen_view(prepared)  # what the trainer runs once observers are frozen
    frozen = time_steps(step, imgs, targets, max(steps - steps // 2, 1), device,
                        Timing(f"QAT step, observers frozen ({name})", imgs.shape[0]))
    return observing, frozen


# -------------------------------------------------------------------------------------------- report
def ratios(stages: dict[str, dict]) -> dict[str, float]:
    """QAT/float step time per observer phase (of mean times, and of medians, which a busy machine's
    stray slow steps move less), and loader over float-training images/s."""
    out: dict[str, float] = {}
    fl = stages.get("float")
    if fl is None:
        return out
    for key in ("qat_observe", "qat_frozen"):
        if key in stages:
            out[f"{key}_over_float_time"] = stages[key]["mean_ms"] / fl["mean_ms"]
            out[f"{key}_over_float_median_time"] = stages[key]["median_ms"] / fl["median_ms"]
    if "loader" in stages:
        out["loader_over_float_images"] = stages["loader"]["images_per_s"] / fl["images_per_s"]
    return out


def format_table(result: dict) -> str:
    """The stages as one aligned table, then the ratios in words."""
    c = result["config"]
    lines = [f"train_speed: {c['cfg']} act={c['act'] or 'yaml'} imgsz={c['imgsz']} batch={c['batch_size']} "
             f"device={c['device']} ({c['device_name']}) torch {c['torch']} channels_last={c['channels_last']} "
             f"steps={c['steps']} warmup={c['warmup']} data={c['data']} cache={c['cache']}",
             f"{'stage':<44}{'batches':>8}{'mean ms':>11}{'median ms':>11}{'images/s':>11}"]
    for row in result["stages"].values():
        lines.append(f"{row['name']:<44}{row['batches']:>8}{row['mean_ms']:>11.1f}{row['median_ms']:>11.1f}"
                     f"{row['images_per_s']:>11.1f}")
    r = result["ratios"]
    if "qat_observe_over_float_time" in r:
        lines.append(f"QAT/float step time: observers on x{r['qat_observe_over_float_time']:.2f} "
                     f"(medians x{r['qat_observe_over_float_median_time']:.2f}), frozen "
                     f"x{r['qat_frozen_over_float_time']:.2f} (medians x{r['qat_frozen_over_float_median_time']:.2f})"
                     " (goal <= 1.30 on GPU)")
    if "loader_over_float_images" in r:
        lines.append(f"loader/float-training images/s: x{r['loader_over_float_images']:.2f} "
                     "(>= 1: the loader keeps up)")
    return "\n".join(lines)


def _config(opt: dict, device: torch.device) -> dict:
    from utils.torch_utils import describe_device

    name = describe_device(device)
    keys = ("cfg", "act", "imgsz", "batch_size", "steps", "warmup", "workers", "loader_batches", "cache",
            "channels_last", "ema", "qat_config")
    config = {k: (str(opt[k]) if isinstance(opt[k], Path) else opt[k]) for k in keys}
    config.update(device=str(device), device_name=name, torch=torch.__version__,
                  data=str(opt["data"] or DEFAULT_DATA.relative_to(ROOT)))
    return config


def _bench_models(opt: dict, device: torch.device, nc: int, hyp: dict) -> dict[str, dict]:
    """Float then QAT steps on one random batch; each model is freed before the next is built."""
    batch = random_batch(opt["batch_size"], opt["imgsz"], nc, device, opt["seed"])
    if opt["channels_last"]:
        batch = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])
    model = build_float_model(opt["cfg"], nc, opt["act"], device, opt["seed"])
    if opt["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    fl = bench_float(model, batch, hyp, opt["steps"], opt["warmup"], device, opt["ema"])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_float_model(opt["cfg"], nc, opt["act"], device, opt["seed"])
    observe, frozen = bench_qat(model, batch, hyp, opt["steps"], opt["warmup"], device, opt["qat_config"],
                                opt["ema"], opt["channels_last"])
    return {"float": fl.to_dict(), "qat_observe": observe.to_dict(), "qat_frozen": frozen.to_dict()}


def run(cfg: str | Path = "yolov5s.yaml", imgsz: int = 640, batch_size: Optional[int] = None, steps: int = 20,
        warmup: int = 3, workers: int = 8, device: str = "", data: Optional[str | Path] = None,
        cache: Optional[str] = None, act: Optional[str] = None, memory_format: str = "auto",
        hyp: str | Path | dict = DEFAULT_HYP, qat_config: Optional[str | Path] = None, ema: bool = False,
        loader_batches: Optional[int] = None, no_loader: bool = False, seed: int = 0,
        json_out: Optional[str | Path] = None) -> dict:
    """Measure loader, float and QAT training throughput; print the table, return (and save) the results.

    ``batch_size`` None: 64 on CUDA, 8 on CPU. ``loader_batches`` None: ``steps``, at least 30 (cheap, and
    short loader runs are noisy).
    """
    from utils.data.data_config import check_img_size
    from utils.torch_utils import keep_freed_memory, select_device, use_channels_last

    if steps < 2:
        raise ValueError(f"train_speed: --steps must be >= 2 (one per QAT observer phase), got {steps}")
    dev = select_device(device)
    keep_freed_memory(dev)  # as train.py does
    channels_last = use_channels_last(memory_format, dev)  # the trainer's choice for this device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py without --deterministic
    opt = {"cfg": cfg, "act": act, "imgsz": check_img_size(imgsz, 32, floor=64), "steps": steps, "warmup": warmup,
           "batch_size": batch_size or (64 if dev.type == "cuda" else 8), "workers": workers,
           "loader_batches": loader_batches or max(steps, 30), "cache": cache, "channels_last": channels_last,
           "ema": ema, "qat_config": qat_config, "data": data, "seed": seed}
    hyp_dict = load_hyp(hyp)
    source, nc = resolve_data(data)
    result: dict[str, Any] = {"config": _config(opt, dev), "stages": {}}
    if not no_loader:
        timing, setup_s = time_loader(source, opt["imgsz"], opt["batch_size"], hyp_dict, opt["loader_batches"],
                                      warmup, workers, cache)
        result["stages"]["loader"] = timing.to_dict()
        result["config"]["loader_setup_s"] = setup_s
    result["stages"].update(_bench_models(opt, dev, nc, hyp_dict))
    result["ratios"] = ratios(result["stages"])
    print(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
        LOGGER.info(f"results written to {json_out}")
    return result


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model yaml (a name in models/ or a path)")
    p.add_argument("--act", type=str, default=None, help="activation for every conv block (e.g. relu)")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train image size (pixels)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed train steps (QAT: half observing, half frozen)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps / loader batches first")
    p.add_argument("--loader-batches", type=int, default=None,
                   help="timed loader batches (default: --steps, at least 30)")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    p.add_argument("--device", type=str, default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--data", type=str, default=None, help="dataset yaml (default: the synthetic shapes set)")
    p.add_argument("--hyp", type=str, default=str(DEFAULT_HYP), help="hyperparameters (augmentation, loss)")
    p.add_argument("--cache", type=str, nargs="?", const="ram", default=None, help="image cache: ram or disk")
    p.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"), default="auto",
                   help="model and batch layout, as train.py's flag (auto: channels_last on CUDA)")
    p.add_argument("--ema", action="store_true", help="include the trainer's EMA update in each step")
    p.add_argument("--qat-config", type=str, default=None, help="QAT config yaml (default data/quant/default.yaml)")
    p.add_argument("--no-loader", action="store_true", help="skip the loader measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", type=str, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "train_speed", errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    if str(ROOT) not in sys.path:  # `python bench/train_speed.py` as well as `python -m bench.train_speed`
        sys.path.insert(0, str(ROOT))
    sys.exit(main(parse_opt()))
