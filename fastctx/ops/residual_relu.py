"""Residual epilogue of the Adaptive Context Module: relu(relu(BN(y)) + residual).

BatchNorm enters as a per-channel affine map (scale, shift) that the caller
derives from batch statistics (train) or running statistics (eval); because
scale and shift are ordinary autograd tensors, the gradient through the batch
statistics is handled by autograd outside this op.
"""
from __future__ import annotations

import torch

from .. import reference
from ._common import (amp_dtype, check_same, check_tensor, compute_dtype, kernels, op_backend, reference_forward,
                      wrapper_backend)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_bytes(height: int, width: int) -> int:
    """Bytes per (b, c) plane of the saved out > 0 mask: one bit per pixel."""
    return (height * width + 7) // 8


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


def new_mask(y: torch.Tensor, save_mask: bool) -> torch.Tensor:
    """The forward's mask output for y: uint8 [B, C, ceil(H*W / 8)], or [0] without save_mask."""
    batch, chans, height, width = y.shape
    shape = (batch, chans, mask_bytes(height, width)) if save_mask else (0,)
    return torch.empty(shape, dtype=torch.uint8, device=y.device)


@torch.library.custom_op("fastctx::residual_relu", mutates_args=())
def _residual_relu(
    y: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, save_mask: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = op_backend(backend, y)
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format), new_mask(y, save_mask)
    if backend == "reference":
        out = reference_forward(reference.residual_relu, [y, residual, scale, shift])
        return out, (pack_mask(out > 0) if save_mask else new_mask(y, False))
    return kernels(backend).residual_relu_fwd(y.contiguous(), residual.contiguous(), scale.contiguous(),
                                              shift.contiguous(), save_mask)


@_residual_relu.register_fake
def _(y, residual, scale, shift, save_mask, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format), new_mask(y, save_mask)


@torch.library.custom_op("fastctx::residual_relu_backward", mutates_args=())
def _residual_relu_backward(
    grad: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = op_backend(backend, y)
    if y.numel() == 0:
        zero = torch.zeros_like(y, memory_format=torch.contiguous_format)
        return zero, zero.clone(), torch.zeros_like(scale), torch.zeros_like(shift)
    if backend == "reference":
        return _reference_backward(grad, y, mask, scale, shift)
    return kernels(backend).residual_relu_bwd(
        grad.contiguous(), y.contiguous(), mask.contiguous(), scale.contiguous(), shift.contiguous()
    )


def _reference_backward(grad, y, mask, scale, shift):
    """The backward of docs/kernels.md in eager PyTorch, from the forward's packed out > 0."""
    shape = (1, -1, 1, 1)
    g = grad * unpack_mask(mask, y.shape)
    pre = y * scale.view(shape).to(y.dtype) + shift.view(shape).to(y.dtype)  # as reference.residual_relu
    gu = g.to(scale.dtype) * (pre > 0)
    grad_y = (gu * scale.view(shape)).to(y.dtype)
    return (grad_y.contiguous(), g.contiguous(), (gu * y.to(scale.dtype)).sum(dim=(0, 2, 3)),
            gu.sum(dim=(0, 2, 3)))


@_residual_relu_backward.register_fake
def _(grad, y, mask, scale, shift, backend):
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(y, memory_format=torch.contiguous_format),
            torch.empty_like(scale), torch.empty_like(shift))


def _setup_context(ctx, inputs, output):
    y, residual, scale, shift, save_mask, backend = inputs
    out, mask = output
    if not save_mask and any(ctx.needs_input_grad[:4]):
        raise RuntimeError("fastctx::residual_relu: a gradient is needed but the forward ran with "
                           "save_mask=False; call fastctx.ops.residual_relu, which sets it")
    ctx.mark_non_differentiable(mask)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero "gradient" for the mask
    ctx.save_for_backward(y, mask, scale, shift)
    ctx.backend = backend


def _backward(ctx, grad, _grad_mask):
    if grad is None:  # only reached if out's gradient is undefined; the mask never has one
        return None, None, None, None, None, None
    y, mask, scale, shift = ctx.saved_tensors
    return (*_residual_relu_backward(grad, y, mask, scale, shift, ctx.backend), None, None)


_residual_relu.register_autograd(_backward, setup_context=_setup_context)


def residual_relu(y, residual, scale, shift) -> torch.Tensor:
    """relu(relu(y * scale[c] + shift[c]) + residual), fused in one pass.

    y, residual: [B, C, H, W] of one dtype; scale, shift: [C] in float32
    (float64 for float64 y), e.g. a BatchNorm folded to an affine map. Inside
    autocast y and residual may differ in dtype; the result has their promoted
    dtype, as the eager expression would (CPU: computed by the fp32 kernel).
    """
    check_tensor(y, "y", 4, "of shape [B, C, H, W]")
    check_tensor(residual, "residual", 4, "of shape [B, C, H, W]")
    check_tensor(scale, "scale", 1, "of shape [C]")
    check_tensor(shift, "shift", 1, "of shape [C]")
    amp = amp_dtype(y)
    check_same({"y": y, "residual": residual}, same_dtype=amp is None)
    check_same({"scale": scale, "shift": shift}, same_dtype=amp is None)
    if residual.shape != y.shape:
        raise ValueError(f"residual must have y's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    if scale.shape != (y.shape[1],) or shift.shape != (y.shape[1],):
        raise ValueError(f"scale and shift must have shape ({y.shape[1]},), got {tuple(scale.shape)}, {tuple(shift.shape)}")
    if scale.device != y.device:
        raise ValueError(f"scale is on {scale.device} but y is on {y.device}: put all inputs on one device")
    compute = y.dtype if amp is None else compute_dtype(y.device, amp)
    backend = wrapper_backend(y.device, compute)
    if backend == "reference":
        return reference.residual_relu(y, residual, scale, shift)
    acc = _acc_dtype(compute)
    # The bit mask is for the backward: only when autograd will ask for one.
    save_mask = torch.is_grad_enabled() and any(t.requires_grad for t in (y, residual, scale, shift))
    out, _ = _residual_relu(y.to(compute), residual.to(compute), scale.to(acc), shift.to(acc), save_mask, backend)
    return out if amp is None else out.to(torch.promote_types(y.dtype, residual.dtype))
