"""Split a YOLO image folder in two at random, for scoring on images the model never saw.

Usage:
    python -m bench.split_dataset --images ../shared/datasets/coco128/images/train2017 --out split --seed 0

Writes ``train.txt`` and ``val.txt`` (absolute image paths; labels are found as for any YOLO dataset,
``images/`` -> ``labels/``) and ``split.yaml`` with the class names of ``--names`` (default data/coco128.yaml).
The notes' "coco128 split in two" is this command with seed 0: 64 images to train and calibrate on, 64 to
score on.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def split(images: Path, out: Path, seed: int = 0, train_fraction: float = 0.5,
          names: Path = ROOT / "data" / "coco128.yaml") -> Path:
    """Write the two lists and the dataset yaml under ``out``; returns the yaml's path."""
    files = sorted(p.resolve() for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{images}: needs at least 2 images to split, found {len(files)}")
    random.Random(seed).shuffle(files)
    n_train = min(max(1, round(len(files) * train_fraction)), len(files) - 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("".join(f"{p}\n" for p in sorted(files[:n_train])), encoding="utf-8")
    (out / "val.txt").write_text("".join(f"{p}\n" for p in sorted(files[n_train:])), encoding="utf-8")
    class_names = yaml.safe_load(Path(names).read_text(encoding="utf-8"))["names"]
    data = {"path": str(out.resolve()), "train": "train.txt", "val": "val.txt", "names": class_names}
    yaml_file = out / "split.yaml"
    yaml_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return yaml_file


def parse_opt(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of images (their labels in the matching labels/ folder)")
    p.add_argument("--out", required=True, help="folder for train.txt, val.txt and split.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--names", default=str(ROOT / "data" / "coco128.yaml"), help="dataset yaml with the class names")
    return p.parse_args(argv)


if __name__ == "__main__":
    o = parse_opt()
    try:
        print(split(Path(o.images), Path(o.out), o.seed, o.train_fraction, Path(o.names)))
    except (ValueError, OSError) as e:
        sys.exit(f"split_dataset: {e}")
