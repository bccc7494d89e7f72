"""A small CNN classifier for 28x28 grey images (10 classes).

Used as the cost of class-conditional D-Flow and, through :meth:`SmallCNN.features`, as the feature
extractor of an FID computed on in-repo features (not Inception FID: no downloaded weights exist
offline). GroupNorm only, so the output for a sample does not depend on the rest of the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["SmallCNN"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
    )


class SmallCNN(nn.Module):
    """conv blocks 28 -> 14 -> 7 -> global average pool -> linear.

    Args:
        in_channels: image channels.
        channels: widths of the three conv blocks; the last one is the feature width F.
        num_classes: number of logits.
        dropout: dropout before the linear head (training only).

    ``forward(x)``: ``x: [B, C, H, W]`` in ``[-1, 1]`` -> logits ``[B, num_classes]``.
    ``features(x)``: the penultimate (pooled) features ``[B, F]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        num_classes: int = 10,
        dropout: float = 0.2,
    ):
        super().__init__()
        c1, c2, c3 = (int(c) for c in channels)
        self.config = dict(in_channels=int(in_channels), channels=[c1, c2, c3],
                           num_classes=int(num_classes), dropout=float(dropout))
        self.body = nn.Sequential(
            _block(in_channels, c1), nn.MaxPool2d(2),
            _block(c1, c2), nn.MaxPool2d(2),
            _block(c2, c3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c3, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, H, W]`` -> penultimate features ``[B, F]``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
