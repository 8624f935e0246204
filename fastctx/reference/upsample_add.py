"""Reference of upsample_add: IIWA's `x = shortcut + interpolate(tokens)` after the inter-window attention.

Bilinear upsampling with align_corners=True, as the released ULLMC code calls
F.interpolate, from the channels-last token grid to the residual's size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(tokens: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsample (align_corners=True) of tokens [B, h, w, C] to [B, H, W, C], channels last."""
    up = F.interpolate(tokens.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=True)
    return up.permute(0, 2, 3, 1)


def upsample_add(tokens: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + bilinear upsample (align_corners=True) of tokens to residual's size, channels last.

    tokens [B, h, w, C], residual [B, H, W, C] -> [B, H, W, C] (IIWA's
    `x = shortcut + interpolate(xg)` after the inter-window attention).
    """
    if tokens.dim() != 4 or residual.dim() != 4 or tokens.shape[0] != residual.shape[0] \
            or tokens.shape[3] != residual.shape[3]:
        raise ValueError(f"upsample_add expects tokens [B, h, w, C] and residual [B, H, W, C], got "
                         f"{tuple(tokens.shape)} and {tuple(residual.shape)}")
    return residual + upsample(tokens, residual.shape[1:3])
