"""What mmseg's BaseDecodeHead gives every head here: Dropout2d + the `conv_seg` classifier."""
from __future__ import annotations

import torch
import torch.nn as nn


class DecodeHead(nn.Module):
    """Owns `dropout` and `conv_seg` (initialised Normal(0, 0.01), bias 0, as mmseg)."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1, align_corners: bool = False):
        super().__init__()
        self.channels, self.num_classes, self.align_corners = channels, num_classes, align_corners
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.constant_(self.conv_seg.bias, 0)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)
