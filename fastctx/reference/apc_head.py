"""mmsegmentation's ACM / APCHead forward, line for line, over fastctx.nn modules.

These take the module (for its parameters) and run the exact eager maths of
mmseg 1.x `apc_head.py`, so `fused=False` modules and the tests' oracle are the
computation users run today.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acm_forward(acm, x: torch.Tensor) -> torch.Tensor:
    pooled_x = F.adaptive_avg_pool2d(x, acm.pool_scale)
    x = acm.input_redu_conv(x)
    pooled_x = acm.pooled_redu_conv(pooled_x)
    batch_size = x.size(0)
    pooled_x = pooled_x.view(batch_size, acm.channels, -1).permute(0, 2, 1).contiguous()
    global_info = acm.global_info(F.adaptive_avg_pool2d(x, 1))
    # mmseg resizes the 1x1 global vector to (H, W) bilinearly: a broadcast.
    global_info = F.interpolate(global_info, size=x.shape[2:], mode="bilinear", align_corners=False)
    affinity_matrix = acm.gla(x + global_info).permute(0, 2, 3, 1).reshape(batch_size, -1, acm.pool_scale ** 2)
    affinity_matrix = torch.sigmoid(affinity_matrix)
    z_out = torch.matmul(affinity_matrix, pooled_x)
    z_out = z_out.permute(0, 2, 1).contiguous()
    z_out = z_out.view(batch_size, acm.channels, x.size(2), x.size(3))
    z_out = acm.residual_conv(z_out)
    z_out = F.relu(z_out + x)
    if acm.fusion:
        z_out = acm.fusion_conv(z_out)
    return z_out


def apc_head_forward(head, x: torch.Tensor) -> torch.Tensor:
    acm_outs = [x]
    for acm_module in head.acm_modules:
        acm_outs.append(acm_forward(acm_module, x))
    acm_outs = torch.cat(acm_outs, dim=1)
    output = head.bottleneck(acm_outs)
    return head.cls_seg(output)
