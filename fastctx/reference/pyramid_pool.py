"""Reference of pyramid_pool: mmsegmentation's per-scale adaptive average pooling (apc_head.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_pool(x: torch.Tensor, scales) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, sum(s*s)]: adaptive average pools, concatenated."""
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in scales], dim=2)
