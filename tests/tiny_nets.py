"""Small non-YOLO networks for quant/ tests: shapes that exercise fusion and shared quantizers."""
from __future__ import annotations

import torch
import torch.nn as nn


class AddConcatNet(nn.Module):
    """Conv-BN-ReLU stem, two branches joined by an add and a concat (shared quantizers), optionally
    through a max-pool, then a signed 1x1 head conv."""

    def __init__(self, pool: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 1, 1) if pool else None
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        b = self.b(s) if self.pool is None else self.pool(self.b(s))
        return self.head(torch.cat([self.a(s) + s, b], 1))


def yolov5p_checkpoints(out, imgsz: int = 64, nc: int = 6, calib_images: int = 0) -> dict:
    """{'float': path, 'qat': path}: a fresh ReLU yolov5p and its prepared (QAT) version, saved as
    checkpoints in ``out``; the QAT one calibrated on ``calib_images`` random images when > 0."""
    from pathlib import Path

    from models.yolo import DetectionModel
    from quant.calibrate import calibrate
    from utils.checkpoint import make_checkpoint, save_checkpoint
    from utils.qat import prepare_qat_model, qat_checkpoint_entry

    torch.manual_seed(0)
    out = Path(out)
    model = DetectionModel("yolov5p.yaml", nc=nc, act="relu")
    float_pt = save_checkpoint(make_checkpoint(model), out / "float.pt")
    prepared = prepare_qat_model(model, imgsz)
    if calib_images:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (calib_images, 3, imgsz, imgsz), dtype=torch.uint8, generator=gen)
        calibrate(prepared, [images], calib_images)
    qat_pt = save_checkpoint(make_checkpoint(prepared, quant=qat_checkpoint_entry(prepared)), out / "qat.pt")
    return {"float": float_pt, "qat": qat_pt}
