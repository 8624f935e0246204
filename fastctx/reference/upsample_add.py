"""Reference of upsample_add: IIWA's `x = shortcut + interpolate(tokens)` after the inter-window attention.

Bilinear upsampling with align_corners=True, as the released ULLMC code calls
F.interpolate, from the channels-last token grid to the residual's size; and
upsample_add_layer_norm, the same sum with the LayerNorm that reads it next
(IIWA's proj2 norm, ULLMC's cross-scale norm2).
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


def upsample_add_layer_norm(tokens: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5):
    """(out, LayerNorm over C of out): out = upsample_add(tokens, residual), as IIWA's
    `x = shortcut + interpolate(xg); x + proj2(x)` computes proj2's norm from the stored sum."""
    out = upsample_add(tokens, residual)
    return out, F.layer_norm(out, (out.shape[-1],), weight, bias, eps)
