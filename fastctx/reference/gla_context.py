"""Reference of gla_context: the affinity-weighted context of mmsegmentation's ACM (apc_head.py).

Written the way mmsegmentation computes it (the `gla` 1x1 conv, sigmoid,
reshape/permute and matmul with the pooled features), so the fused kernels are
checked against the maths users run today.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gla_context(x, weight, bias, pooled, group_sizes) -> torch.Tensor:
    """z_g = sigmoid(gla(x_g) + bias_g) @ pooled_g for each group g, as mmseg's ACM.forward."""
    batch, channels_all, height, width = x.shape
    groups = len(group_sizes)
    channels = channels_all // groups
    outs = []
    offset = 0
    for g, size in enumerate(group_sizes):
        x_g = x[:, g * channels:(g + 1) * channels]
        w_g = weight[offset:offset + size]
        # [B, S, H, W] -> [B, H*W, S], as mmseg's gla(...).permute(0, 2, 3, 1).reshape(...)
        logits = F.conv2d(x_g, w_g[:, :, None, None]) + bias[:, offset:offset + size, None, None]
        affinity = torch.sigmoid(logits.permute(0, 2, 3, 1).reshape(batch, -1, size))
        pooled_g = pooled[:, :, offset:offset + size].permute(0, 2, 1)  # [B, S, C]
        z = torch.matmul(affinity, pooled_g)  # [B, H*W, C]
        outs.append(z.permute(0, 2, 1).reshape(batch, channels, height, width))
        offset += size
    return torch.cat(outs, dim=1)
