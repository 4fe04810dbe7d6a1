"""Train a YOLOv5 detector on a custom dataset (flags as YOLOv5 v7.0's train.py).

Usage:
    python train.py --data synthetic.yaml --cfg yolov5n.yaml --weights '' --img 256   # from scratch
    python train.py --data coco128.yaml --weights yolov5s.pt --img 640                 # fine-tune
    python train.py --resume                           # continue the latest runs/train/exp*/weights/last.pt
    torchrun --nproc_per_node 2 train.py ...           # DDP (nccl on CUDA, gloo on CPU)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from utils.torch_utils import MEMORY_FORMATS
from utils.train.config import DistContext, TrainConfig

LOGGER = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent
ACTIVATIONS = ("silu", "relu", "relu6")


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse train.py's command line (``argv`` None reads sys.argv)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=str, default="yolov5s.pt", help="initial weights path ('' for none)")
    p.add_argument("--cfg", type=str, default="", help="model.yaml path")
    p.add_argument("--data", type=str, default=str(ROOT / "data/synthetic.yaml"), help="dataset.yaml path")
    p.add_argument("--hyp", type=str, default=str(ROOT / "data/hyps/hyp.scratch-low.yaml"), help="hyperparameters path")
    p.add_argument("--epochs", type=int, default=100, help="total training epochs")
    p.add_argument("--batch-size", type=int, default=16, help="total batch size for all GPUs")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    p.add_argument("--rect", action="store_true", help="rectangular training")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    p.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    p.add_argument("--noval", action="store_true", help="only validate final epoch")
    p.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    p.add_argument("--noplots", action="store_true", help="save no plot files")
    p.add_argument("--evolve", type=int, nargs="?", const=300, help="not supported here")
    p.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    p.add_argument("--image-weights", action="store_true", help="not supported here")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    p.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    p.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    p.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    p.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    p.add_argument("--project", default=str(ROOT / "runs/train"), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    p.add_argument("--quad", action="store_true", help="not supported here")
    p.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="Label smoothing epsilon")
    p.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    p.add_argument("--freeze", nargs="+", type=int, default=[0], help="Freeze layers: backbone=10, first3=0 1 2")
    p.add_argument("--save-period", type=int, default=-1, help="Save checkpoint every x epochs (disabled if < 1)")
    p.add_argument("--seed", type=int, default=0, help="Global training seed")
    p.add_argument("--local_rank", type=int, default=-1, help="Automatic DDP Multi-GPU argument, do not modify")
    p.add_argument("--act", type=str, choices=ACTIVATIONS, default=None, help="activation for every conv block")
    p.add_argument("--qat", action="store_true", help="quantization-aware training (power-of-2 INT8) from --weights")
    p.add_argument("--qat-config", type=str, default=str(ROOT / "data/quant/default.yaml"),
                   help="QAT config yaml (per-layer overrides), see data/quant/")
    p.add_argument("--qat-observer-epochs", type=float, default=1.0,
                   help="QAT: epochs (fractions allowed) during which observers keep calibrating in training, "
                        "after the PTQ calibration; 0: ranges stay as calibrated (needs --qat-calib-images > 0)")
    p.add_argument("--qat-observer-every", type=int, default=8,
                   help="QAT: observers count every N-th batch of their epochs (the others train at the frozen-"
                        "observer cost); lowered to keep 8 observed batches when --qat-calib-images is 0")
    p.add_argument("--qat-freeze-bn-epoch", type=int, default=2,
                   help="QAT: epoch from which BN statistics are frozen (-1: never)")
    p.add_argument("--qat-calib-images", type=int, default=512,
                   help="QAT: calibrate (PTQ) on this many training images before the first step; 0: observers start in training")
    p.add_argument("--qat-graphs", action="store_true", help="QAT: write Graphviz graphs before/after prepare")
    p.add_argument("--qat-distill", nargs="?", const=True, default="",
                   help="QAT: distil from the float model (default: --weights; or give a float .pt), hyp 'distill' gain")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="model/batch layout: auto = channels_last on CUDA (about 2x faster convs), contiguous on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (first steps compile)")
    p.add_argument("--deterministic", action="store_true",
                   help="CUDA: deterministic kernels, no cuDNN autotuning (slower; bit-reproducible runs and resumes)")
    return p.parse_args(argv)


def _refuse_unsupported(opt: argparse.Namespace) -> None:
    for flag, on in (("--evolve", opt.evolve), ("--image-weights", opt.image_weights), ("--quad", opt.quad)):
        if on:
            raise ValueError(f"{flag} is not supported by this trainer; run without it")


def _teacher_path(opt: argparse.Namespace) -> str:
    """--qat-distill: the teacher's file ('' for none); alone, the float --weights the QAT run starts from.
    Stored as a path in opt.yaml, so --resume reloads the same teacher."""
    if not opt.qat_distill:
        return ""
    if not opt.qat:
        raise ValueError("--qat-distill distils a float teacher into a QAT run; add --qat")
    path = opt.weights if opt.qat_distill is True else _find_weights(str(opt.qat_distill))
    if not path:
        raise ValueError("--qat-distill: no teacher; give --weights FLOAT.pt or --qat-distill FLOAT.pt")
    return str(path)


def _latest_run(project: str | Path) -> Path:
    runs = sorted(Path(project).glob("*/weights/last.pt"), key=lambda f: f.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"{project}: no */weights/last.pt to resume; pass --resume path/to/last.pt")
    return runs[-1]


def _resumed_opt(opt: argparse.Namespace) -> argparse.Namespace:
    """The options of the run being resumed (stored in its checkpoint), pointed at its last.pt."""
    from utils.checkpoint import CheckpointError, load_checkpoint

    last = Path(opt.resume) if isinstance(opt.resume, (str, Path)) else _latest_run(opt.project)
    saved = load_checkpoint(last).get("opt")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{last}: has no saved training options, can not resume")
    new = argparse.Namespace(**{**vars(parse_opt([])), **saved})
    new.cfg, new.weights, new.resume = "", str(last), True
    new.save_dir = str(last.resolve().parent.parent)
    return new


def _find_weights(weights: str) -> str:
    """A bare name like 'yolov5s.pt' may live in the repository's weights/ folder."""
    if not weights or Path(weights).is_file():
        return weights
    for candidate in (ROOT / weights, ROOT / "weights" / Path(weights).name):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{weights}: weights file not found (see weights/README.md, "
                            "or train from scratch with --weights '' --cfg yolov5n.yaml)")


def _init_distributed(opt: argparse.Namespace, ctx: DistContext) -> tuple[torch.device, bool]:
    """Device for this process; joins the process group under torchrun (LOCAL_RANK set)."""
    from utils.torch_utils import keep_freed_memory, select_device

    local_rank = ctx.local_rank
    device = select_device(opt.device, batch_size=opt.batch_size)
    keep_freed_memory(device)
    if local_rank == -1:
        return device, False
    import torch.distributed as dist

    world = ctx.world_size
    if opt.batch_size % world:
        raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {world}")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, created


def _make_save_dir(opt: argparse.Namespace, ctx: DistContext) -> Path:
    """Run folder: the resumed one, or a fresh numbered project/name (same on every DDP rank)."""
    from utils.paths import check_writable_dir, increment_path

    rank = ctx.rank
    save_dir = [opt.save_dir if opt.resume else None]
    if rank in (-1, 0):
        if not opt.resume:
            save_dir[0] = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok, claim=True))
        check_writable_dir(save_dir[0])
    if rank != -1:
        import torch.distributed as dist

        dist.broadcast_object_list(save_dir, 0)
    return Path(save_dir[0])


def make_opt(**kwargs) -> argparse.Namespace:
    """train.py's options with ``kwargs`` applied, the hyp file read and checked (or, for --resume,
    the options of the run being resumed)."""
    from utils.config_checks import check_flags, read_yaml
    from utils.train.setup import check_hyp

    opt = parse_opt([])
    unknown = [k for k in kwargs if not hasattr(opt, k)]
    if unknown:
        raise TypeError(f"train.run: unknown options {unknown}")
    for k, v in kwargs.items():
        setattr(opt, k, v)
    _refuse_unsupported(opt)
    check_flags(vars(opt))  # before any work: a bad --batch-size or --epochs is one line, not a traceback
    if opt.resume:
        return _resumed_opt(opt)
    opt.weights = _find_weights(str(opt.weights or ""))
    opt.qat_distill = _teacher_path(opt)
    opt.cfg, opt.data, opt.project = str(opt.cfg or ""), str(opt.data), str(opt.project)
    if opt.qat and Path(str(opt.hyp)) == ROOT / "data/hyps/hyp.scratch-low.yaml":
        opt.hyp = str(ROOT / "data/hyps/hyp.qat.yaml")  # --qat without --hyp: QAT's own defaults
    hyp_source = opt.hyp if isinstance(opt.hyp, (str, Path)) else "hyp"
    if isinstance(opt.hyp, (str, Path)):
        opt.hyp = read_yaml(opt.hyp, "hyperparameter")
    check_hyp(opt.hyp, hyp_source)
    opt.freeze = [int(x) for x in (opt.freeze if isinstance(opt.freeze, (list, tuple)) else [opt.freeze])]
    return opt


def seed_run(opt: argparse.Namespace, device: torch.device, ctx: DistContext | None = None) -> None:
    """Seed every generator. Deterministic kernels on the CPU always (they cost nothing there); on CUDA
    only with --deterministic, since cuDNN's autotuned kernels are much faster and change results only
    at float-rounding level (a resumed GPU run then matches the uninterrupted one only statistically)."""
    from utils.torch_utils import init_seeds

    deterministic = bool(getattr(opt, "deterministic", False)) or device.type != "cuda"
    init_seeds(opt.seed + 1 + (ctx or DistContext()).rank, deterministic=deterministic)
    if not deterministic:  # (also undoes an earlier deterministic run in this process, e.g. a benchmark's)
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def run(**kwargs):
    """Train with train.py's flags as keyword arguments; returns the final (P, R, mAP50, mAP50-95, losses).

    Example:
        >>> run(data="synthetic.yaml", cfg="yolov5n.yaml", weights="", imgsz=128, epochs=1)  # doctest: +SKIP
    """
    from utils.train.trainer import Trainer

    stop_after_epoch = kwargs.pop("_stop_after_epoch", None)  # test hook: simulate an interruption
    opt = make_opt(**kwargs)
    ctx = DistContext.from_env()
    device, created = _init_distributed(opt, ctx)
    trainer = None
    try:
        opt.save_dir = str(_make_save_dir(opt, ctx))
        seed_run(opt, device, ctx)
        cfg = TrainConfig.from_namespace(opt)
        trainer = Trainer(cfg, device, Path(cfg.save_dir), ctx, stop_after_epoch=stop_after_epoch)
        trainer.setup()
        results = trainer.fit()
        if created:
            import torch.distributed as dist

            dist.barrier()  # every rank waits for rank 0's final validation before the group is torn down
        return results
    finally:
        if created:
            import gc

            import torch.distributed as dist

            # Free DDP, its reducer and the loaders while the interpreter is fully alive: gloo work
            # objects released during interpreter shutdown abort the process (SIGABRT).
            trainer = None
            gc.collect()
            dist.destroy_process_group()


def main(opt: argparse.Namespace) -> int:
    """Run training from parsed flags; library errors become one line and exit code 1."""
    from utils.log import setup_logging
    from utils.train.trainer import NonFiniteLossError

    setup_logging(rank=DistContext.from_env().rank)
    if opt.evolve:
        LOGGER.error("train.py: error: --evolve (hyperparameter evolution) is not supported")
        return 2
    try:
        run(**vars(opt))
    except (ValueError, OSError, NonFiniteLossError) as e:  # library errors carry file and reason
        LOGGER.error(f"train.py: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
