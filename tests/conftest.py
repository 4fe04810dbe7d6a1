"""Shared pytest fixtures: where the read-only reference data lives."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _shared_dir() -> Path:
    return Path(os.environ.get("YQ_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only folder with coco128, official weights and sample images."""
    path = _shared_dir()
    if not (path / "weights").is_dir():
        raise FileNotFoundError(f"{path}: shared data folder not found (set YQ_SHARED)")
    return path


@pytest.fixture(scope="session")
def coco128_yaml(tmp_path_factory, shared_dir) -> Path:
    """A dataset yaml that points at the shared coco128 (train and val are the same 128 images)."""
    import yaml

    names = [
        "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
        "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
        "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
        "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
        "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
        "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
        "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
        "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
        "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
        "teddy bear", "hair drier", "toothbrush",
    ]
    data = {
        "path": str(shared_dir / "datasets" / "coco128"),
        "train": "images/train2017",
        "val": "images/train2017",
        "names": dict(enumerate(names)),
    }
    out = tmp_path_factory.mktemp("data") / "coco128.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out
