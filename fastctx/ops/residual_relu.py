"""Residual epilogue of the Adaptive Context Module: relu(relu(BN(y)) + residual).

BatchNorm enters as a per-channel affine map (scale, shift) that the caller
derives from batch statistics (train) or running statistics (eval); because
scale and shift are ordinary autograd tensors, the gradient through the batch
statistics is handled by autograd outside this op. The forward saves !(out <= 0)
as a bit mask for the backward (layout: fastctx/reference/residual_relu.py).

Backends: reference (fastctx/reference/residual_relu.py), cpu (csrc/cpu/residual_relu.cpp), cuda
(csrc/cuda/residual_relu.cu), triton (kernels/residual_relu.py). Contract: docs/kernels.md.
"""
from __future__ import annotations

import torch

from ..reference.residual_relu import active, new_mask, pack_mask
from ..reference.residual_relu import residual_relu as _reference
from ..reference.residual_relu import residual_relu_backward as _reference_backward
from ._checks import check_same, check_tensor
from ._dispatch import FusedOp, Support, amp_dtype, compute_dtype, custom_op, reference_forward, register

OP = register(FusedOp("residual_relu", cpu=Support(), cuda=Support(), triton=Support()))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _facts(y: torch.Tensor) -> dict:
    return dict(B=y.shape[0], C=y.shape[1], N=y.shape[2] * y.shape[3])


@custom_op("fastctx::residual_relu")
def _residual_relu(
    y: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, save_mask: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, y.device, y.dtype, _facts(y))
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format), new_mask(y, save_mask)
    if backend == "reference":
        out = reference_forward(_reference, [y, residual, scale, shift])
        return out, (pack_mask(active(out)) if save_mask else new_mask(y, False))
    return OP.kernels(backend).residual_relu_fwd(y.contiguous(), residual.contiguous(), scale.contiguous(),
                                              shift.contiguous(), save_mask)


@_residual_relu.register_fake
def _(y, residual, scale, shift, save_mask, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format), new_mask(y, save_mask)


@custom_op("fastctx::residual_relu_backward")
def _residual_relu_backward(
    grad: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, y.device, y.dtype, _facts(y))
    if y.numel() == 0:
        zero = torch.zeros_like(y, memory_format=torch.contiguous_format)
        return zero, zero.clone(), torch.zeros_like(scale), torch.zeros_like(shift)
    if backend == "reference":
        return _reference_backward(grad, y, mask, scale, shift)
    return OP.kernels(backend).residual_relu_bwd(
        grad.contiguous(), y.contiguous(), mask.contiguous(), scale.contiguous(), shift.contiguous()
    )


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


def _setup_backward_context(ctx, inputs, output):
    grad, y, mask, scale, shift, backend = inputs
    ctx.save_for_backward(grad, y, mask, scale, shift)


def _double_backward(ctx, *grad_grads):
    # The reference backward is plain autograd-able PyTorch (the masks are piecewise constant):
    # differentiate it directly.
    grad, y, mask, scale, shift = ctx.saved_tensors
    outs, pullback = torch.func.vjp(lambda g, t, sc, sh: _reference_backward(g, t, mask, sc, sh),
                                    grad, y, scale, shift)
    cotangents = tuple(torch.zeros_like(o) if gg is None else gg for o, gg in zip(outs, grad_grads))
    d_grad, d_y, d_scale, d_shift = pullback(cotangents)
    return d_grad, d_y, None, d_scale, d_shift, None


_residual_relu_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


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
    backend = OP.wrapper_backend(y.device, compute, _facts(y))
    if backend == "reference":
        return _reference(y, residual, scale, shift)
    acc = _acc_dtype(compute)
    # The bit mask is for the backward: only when autograd will ask for one.
    save_mask = torch.is_grad_enabled() and any(t.requires_grad for t in (y, residual, scale, shift))
    out, _ = _residual_relu(y.to(compute), residual.to(compute), scale.to(acc), shift.to(acc), save_mask, backend)
    return out if amp is None else out.to(torch.promote_types(y.dtype, residual.dtype))
