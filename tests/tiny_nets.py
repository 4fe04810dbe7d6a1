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
