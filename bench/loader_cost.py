"""CPU time one DataLoader worker spends per training sample, measured in this process on one thread.

Usage:
    python -m bench.loader_cost --source ../shared/datasets/coco128/images/train2017 --imgsz 640

What a worker does per batch is timed exactly: mosaic augmentation of each sample (``dataset[i]``,
images cached in RAM), then the collate function as it runs inside a worker (the batch built in
shared memory, ready for the main process). OpenCV and torch are held to one thread, as in a
worker. Divide a GPU host's worker count by this figure for the loader's ceiling in images/s; unlike
a multi-worker measurement on a small machine it does not depend on how many cores are free.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/loader_cost.py` as well as `python -m bench.loader_cost`
    sys.path.insert(0, str(ROOT))

DEFAULT_HYP = ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"


class _WorkerInfo:
    """What torch.utils.data.get_worker_info() returns inside a worker (collate then uses shared memory)."""

    id, num_workers, seed = 0, 1, 0


def run(source: str, imgsz: int = 640, batch_size: int = 16, batches: int = 24, hyp: str = str(DEFAULT_HYP),
        seed: int = 0) -> dict:
    """Milliseconds of one thread per training sample (augmentation + collate); prints and returns them."""
    import cv2
    import torch
    import torch.utils.data._utils.worker as worker_state
    import yaml

    from utils.data.dataset import LoadImagesAndLabels

    cv2.setNumThreads(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with open(hyp, encoding="utf-8") as fh:
        hyp_dict = yaml.safe_load(fh)
    dataset = LoadImagesAndLabels(source, imgsz, batch_size, augment=True, hyp=hyp_dict, cache_images="ram")
    saved = worker_state._worker_info
    worker_state._worker_info = _WorkerInfo()
    try:
        random.seed(seed)
        for i in range(batch_size):  # warm caches
            dataset[i % len(dataset)]
        t0, n = time.perf_counter(), 0
        for b in range(batches):
            batch = [dataset[(b * batch_size + j) % len(dataset)] for j in range(batch_size)]
            imgs = LoadImagesAndLabels.collate_fn(batch)[0]
            if not imgs.is_shared():
                imgs.share_memory_()  # what sending it to the main process would cost
            n += len(batch)
        ms = (time.perf_counter() - t0) / n * 1000
    finally:
        worker_state._worker_info = saved
        torch.set_num_threads(threads)
    print(f"loader_cost: {ms:.2f} ms per sample per worker (imgsz {imgsz}, batch {batch_size}, {n} samples, "
          f"{source})")
    return {"ms_per_sample": ms, "samples": n, "imgsz": imgsz, "batch_size": batch_size}


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="training images (folder, list file or glob)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=24, help="timed batches")
    p.add_argument("--hyp", default=str(DEFAULT_HYP))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(opt: argparse.Namespace) -> int:
    from utils.log import run_cli

    return run_cli(run, opt, "loader_cost", errors=(ValueError, OSError))


if __name__ == "__main__":
    logging.getLogger("utils").setLevel(logging.WARNING)
    sys.exit(main(parse_opt()))
