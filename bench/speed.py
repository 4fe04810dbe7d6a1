"""End-to-end speed in one run on one machine: float training, QAT training and validation.

Usage:
    python -m bench.speed --device 0 --json speed.json          # yolov5s, 640, batch 64, 8 workers, cache ram
    python -m bench.speed --cfg yolov5n.yaml --imgsz 320 --batch-size 16 --images 256 --workers 2   # a CPU

Every training figure is the trainer's own (train.py's code path: loader with mosaic augmentation,
forward, loss, backward, optimizer, EMA), timed per epoch from the first batch to the last step with
the GPU drained; validation is val.py's ``run`` on a model trained here. Rows:

1. float, upstream settings: NCHW layout and deterministic cuDNN kernels, as upstream v7.0 trains;
2. float: this project's defaults (channels_last and cuDNN autotuning on CUDA; on a CPU the two
   rows run the same settings, which shows the noise);
3. QAT: ``--qat`` from row 2's weights, observers on in epoch 0 and frozen afterwards;
4. val: val.py at ``--val-batch-size`` over the validation images, second of two passes.

Ratios: row 2 over row 1 (the speed-ups), QAT over float time per image (the goal is <= 1.3 on a
GPU) and, with ``--upstream-images-per-s`` (upstream's figure from the same machine and settings),
ours over upstream's. Epoch 0 includes worker start-up and kernel autotuning, so the figures are
the mean of the later epochs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/speed.py` as well as `python -m bench.speed`
    sys.path.insert(0, str(ROOT))

LOGGER = logging.getLogger("bench.speed")


def training_speed(epoch_speed: list[dict]) -> dict[str, Any]:
    """images/s of the warm epochs (all but the first when there are several) from Trainer.epoch_speed:
    end to end, and steady (time counted from each epoch's first batch on, i.e. without the wait for
    the loader's pipeline to fill, which a short benchmark epoch pays far more often than a COCO epoch
    of 1,800 steps does)."""
    warm = epoch_speed[1:] if len(epoch_speed) > 1 else epoch_speed
    images, seconds = sum(e["images"] for e in warm), sum(e["seconds"] for e in warm)
    steady_seconds = seconds - sum(e.get("first_batch_s", 0.0) for e in warm)
    return {"images_per_s": images / seconds if seconds > 0 else float("nan"), "images": images,
            "seconds": seconds,
            "steady_images_per_s": images / steady_seconds if steady_seconds > 0 else float("nan"),
            "epochs": [dict(e) for e in epoch_speed]}


def train_once(name: str, project: Path, **options) -> tuple[dict, Path]:
    """One train.py run in this process; returns (speed of the warm epochs, weights folder)."""
    import train
    from utils.torch_utils import select_device
    from utils.train.config import TrainConfig
    from utils.train.trainer import Trainer

    opt = train.make_opt(project=str(project), name=name, exist_ok=True, noval=True, noplots=True, **options)
    device = select_device(opt.device, batch_size=opt.batch_size)
    opt.save_dir = str(project / name)
    train.seed_run(opt, device)
    trainer = Trainer(TrainConfig.from_namespace(opt), device, Path(opt.save_dir))
    trainer.setup()
    trainer.fit()
    return training_speed(trainer.epoch_speed), Path(opt.save_dir) / "weights"


def val_speed(weights: Path, data: str, imgsz: int, batch_size: int, device: str, workers: int,
              project: Path) -> dict[str, Any]:
    """val.py over the validation set twice (the first warms caches and kernels); the second is timed."""
    import val
    from utils.data.data_config import load_data_config
    from utils.data.label_scan import find_image_files
    from utils.torch_utils import time_sync

    kwargs = dict(data=data, weights=str(weights), imgsz=imgsz, batch_size=batch_size, device=device,
                  workers=workers, project=str(project), name="val", exist_ok=True, plots=False)
    val.run(**kwargs)
    t0 = time_sync()
    metrics, _, speeds = val.run(**kwargs)
    seconds = time_sync() - t0
    n = len(find_image_files(load_data_config(data)["val"]))
    return {"images_per_s": n / seconds, "images": n, "seconds": seconds, "map50_95": float(metrics[3]),
            "ms_per_image": {"pre": speeds[0], "inference": speeds[1], "nms": speeds[2]}}


def ratios(rows: dict[str, dict], upstream: Optional[float]) -> dict[str, float]:
    """The speed-ups of this project's defaults, QAT's cost over float, and ours over upstream's."""
    key = "steady_images_per_s"
    fl, base, qat = rows["float"][key], rows["float_upstream_settings"][key], rows["qat"][key]
    out = {"float_over_upstream_settings": fl / base, "qat_over_float_time": fl / qat}
    if upstream:
        out["float_over_upstream"] = fl / upstream
        out["qat_over_upstream"] = qat / upstream
    return out


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"speed: {c['cfg']} imgsz={c['imgsz']} batch={c['batch_size']} workers={c['workers']} "
             f"cache={c['cache']} epochs={c['epochs']} images={c['images']} device={c['device_name']} "
             f"torch {c['torch']}",
             f"{'row':<26}{'images':>8}{'seconds':>9}{'images/s':>10}{'steady images/s':>17}"]
    for key, row in result["rows"].items():
        steady = f"{row['steady_images_per_s']:>17.1f}" if "steady_images_per_s" in row else f"{'':>17}"
        lines.append(f"{key:<26}{row['images']:>8}{row['seconds']:>9.2f}{row['images_per_s']:>10.1f}{steady}")
    lines.append("(ratios from steady images/s: the wait for each epoch's first batch, the loader's pipeline fill, "
                 "left out)")
    r = result["ratios"]
    lines.append(f"float (defaults) / float (upstream settings): x{r['float_over_upstream_settings']:.2f}")
    lines.append(f"QAT / float time per image: x{r['qat_over_float_time']:.2f} (goal <= 1.30 on a GPU)")
    if "float_over_upstream" in r:
        lines.append(f"float / upstream: x{r['float_over_upstream']:.2f} (goal >= 2.5), "
                     f"QAT / upstream float: x{r['qat_over_upstream']:.2f}")
    return "\n".join(lines)


def run(cfg: str = "yolov5s.yaml", imgsz: int = 640, batch_size: Optional[int] = None, epochs: int = 3,
        images: int = 1024, val_images: int = 256, workers: int = 8, cache: Optional[str] = "ram",
        device: str = "", data: Optional[str] = None, act: str = "relu", val_batch_size: int = 32,
        upstream_images_per_s: Optional[float] = None, project: Optional[str] = None,
        json_out: Optional[str] = None) -> dict:
    """Train float (upstream settings, then defaults), then QAT, then validate; print and return the table."""
    from utils.data.synthetic import make_synthetic_dataset
    from utils.torch_utils import describe_device, select_device

    if epochs < 2:
        raise ValueError(f"speed: --epochs must be >= 2 (epoch 0 is warm-up), got {epochs}")
    dev = select_device(device)
    batch_size = batch_size or (64 if dev.type == "cuda" else 8)
    work = Path(project or tempfile.mkdtemp(prefix="yq_speed_"))
    if data is None:
        t0 = time.perf_counter()
        # drawn at most 320 px (generation is single-threaded); the loader resizes to imgsz when it caches,
        # so the per-image augmentation work, the thing timed, is that of imgsz images
        data = str(make_synthetic_dataset(work / "synthetic", n_train=images, n_val=val_images,
                                          img_size=min(imgsz, 320)))
        LOGGER.info(f"synthetic data: {images} + {val_images} images in {time.perf_counter() - t0:.1f}s")
    common = dict(data=data, cfg=cfg, weights="", imgsz=imgsz, batch_size=batch_size, workers=workers,
                  cache=cache, device=device, epochs=epochs, act=act)
    rows: dict[str, dict] = {}
    rows["float_upstream_settings"], _ = train_once("float_upstream_settings", work, memory_format="contiguous",
                                                    deterministic=True, **common)
    rows["float"], weights = train_once("float", work, **common)
    qat = dict(common, weights=str(weights / "last.pt"), cfg="", qat=True)
    rows["qat"], _ = train_once("qat", work, **qat)
    rows["val"] = val_speed(weights / "last.pt", data, imgsz, val_batch_size, device, workers, work)
    result = {"config": {"cfg": cfg, "imgsz": imgsz, "batch_size": batch_size, "workers": workers, "cache": cache,
                         "epochs": epochs, "images": images, "act": act, "device": str(dev),
                         "device_name": describe_device(dev),
                         "torch": torch.__version__, "data": data},
              "rows": rows, "ratios": ratios(rows, upstream_images_per_s)}
    print(format_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="yolov5s.yaml", help="model yaml trained from scratch")
    p.add_argument("--imgsz", "--img", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--epochs", type=int, default=3, help="epochs per training row (>= 2; the first is warm-up)")
    p.add_argument("--images", type=int, default=1024, help="synthetic training images")
    p.add_argument("--val-images", type=int, default=256, help="synthetic validation images")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--cache", nargs="?", const="ram", default="ram", help="image cache: ram (default) or disk")
    p.add_argument("--no-cache", dest="cache", action="store_const", const=None)
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--data", default=None, help="dataset yaml instead of the synthetic set")
    p.add_argument("--act", default="relu", help="activation (QAT needs relu or relu6)")
    p.add_argument("--val-batch-size", type=int, default=32)
    p.add_argument("--upstream-images-per-s", type=float, default=None,
                   help="upstream train.py's images/s on this machine and settings, for the ratio")
    p.add_argument("--project", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "speed", errors=(ValueError, OSError, RuntimeError))


if __name__ == "__main__":
    sys.exit(main(parse_opt()))
