"""Reference of residual_relu (the ACM's residual epilogue) and the layout of its saved bit mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def residual_relu(y, residual, scale, shift) -> torch.Tensor:
    """relu(relu(y * scale + shift) + residual), scale/shift per channel."""
    affine = y * scale.view(1, -1, 1, 1).to(y.dtype) + shift.view(1, -1, 1, 1).to(y.dtype)
    return F.relu(F.relu(affine) + residual)


# The forward saves active(out) for its backward as bits: one uint8 row of ceil(H*W / 8) bytes per (b, c)
# plane, pixel n = h*W + w in bit n % 8 (LSB first) of byte n // 8, the last byte's unused bits 0.


def active(v: torch.Tensor) -> torch.Tensor:
    """Where ReLU passes the gradient: !(v <= 0), i.e. v > 0 or NaN (torch's threshold_backward)."""
    return ~(v <= 0)


def mask_bytes(height: int, width: int) -> int:
    """Bytes per (b, c) plane of the saved active(out) mask: one bit per pixel."""
    return (height * width + 7) // 8


def new_mask(y: torch.Tensor, save_mask: bool) -> torch.Tensor:
    """The forward's mask output for y: uint8 [B, C, ceil(H*W / 8)], or [0] without save_mask."""
    batch, chans, height, width = y.shape
    shape = (batch, chans, mask_bytes(height, width)) if save_mask else (0,)
    return torch.empty(shape, dtype=torch.uint8, device=y.device)


def pack_mask(active: torch.Tensor) -> torch.Tensor:
    """bool [B, C, H, W] -> uint8 [B, C, ceil(H*W / 8)]: pixel n in bit n % 8 of byte n // 8."""
    batch, chans, height, width = active.shape
    n, nbytes = height * width, mask_bytes(height, width)
    flat = torch.zeros(batch, chans, nbytes * 8, dtype=torch.uint8, device=active.device)
    flat[:, :, :n] = active.reshape(batch, chans, n)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=active.device)
    return (flat.view(batch, chans, nbytes, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_mask(mask: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of `pack_mask`: uint8 [B, C, ceil(H*W / 8)] -> bool `shape` [B, C, H, W]."""
    batch, chans, height, width = shape
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(batch, chans, -1)[:, :, :height * width].reshape(shape).bool()


def residual_relu_backward(grad, y, mask, scale, shift):
    """The backward of docs/kernels.md from the forward's packed active(out):
    -> (grad_y, grad_residual, grad_scale, grad_shift)."""
    shape = (1, -1, 1, 1)
    # torch.where, not a product with the mask: relu's backward passes 0 where inactive even for an
    # inf or NaN incoming gradient (inf * 0 would be NaN).
    g = torch.where(unpack_mask(mask, y.shape), grad, 0)
    pre = y * scale.view(shape).to(y.dtype) + shift.view(shape).to(y.dtype)  # as residual_relu
    gu = torch.where(active(pre), g.to(scale.dtype), 0)
    grad_y = (gu * scale.view(shape)).to(y.dtype)
    return (grad_y.contiguous(), g.contiguous(), (gu * y.to(scale.dtype)).sum(dim=(0, 2, 3)),
            gu.sum(dim=(0, 2, 3)))
