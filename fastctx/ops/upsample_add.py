"""IIWA's upsample + residual: residual + bilinear upsample (align_corners=True) of a token grid, channels last.

tokens [B, h, w, C], residual [B, H, W, C] -> out [B, H, W, C] =
residual + F.interpolate(tokens, (H, W), bilinear, align_corners=True), with
PyTorch's source taps (scale (h-1)/(H-1), h == 1 or H == 1 as PyTorch handles
them). The fused kernels read the tokens and the residual along C and write
out once: no permuted copies and no upsampled intermediate.

Backward: grad_residual is grad itself (no copy); grad_tokens = U^T grad, the
transpose of the bilinear map, computed as a gather per token (the output rows
and columns whose taps touch it), in a fixed order: deterministic, no atomics.
The backward is linear in grad; its own backward is the upsampling (reference
maths).

Not an autocast op (eager interpolate and add keep their dtypes on CPU): the
kernels run in the promoted dtype of tokens and residual, the dtype of the
eager `residual + up`. Mixed dtypes are accepted inside autocast (IIWA's
attention output in the autocast dtype, its fp32 residual stream).

Backends: reference (fastctx/reference/upsample_add.py), cpu (csrc/cpu/upsample_add.cpp),
cuda (csrc/cuda/upsample_add.cu), triton (kernels/upsample_add.py). Contract: docs/kernels.md "upsample_add".
"""
from __future__ import annotations

import torch

from ..reference.upsample_add import upsample
from ..reference.upsample_add import upsample_add as _reference
from ._checks import check_same, check_tensor
from ._dispatch import FusedOp, Support, amp_dtype, reference_forward, register


def _triton_limits(facts):
    from fastctx.kernels.upsample_add import limits

    return limits(facts)


def _cuda_limits(facts):
    """The CUDA kernels index pixels, tokens and taps in int32 (csrc/cuda/upsample_add_launch.h)."""
    for what, count in (("B*H*W output pixels", facts["B"] * facts["H"] * facts["W"]),
                        ("B*h*w tokens", facts["B"] * facts["h"] * facts["w"])):
        if count >= 2**31:
            return f"{what} = {count} >= 2^31 (int32 indices); split the batch"
    return None


OP = register(FusedOp("upsample_add",
                      cpu=Support(dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16)}),
                      cuda=Support(limits=_cuda_limits, note="B*H*W, B*h*w < 2^31"),
                      triton=Support(limits=_triton_limits, note="B*H*W < 2^31")))


def _facts(tokens: torch.Tensor, residual: torch.Tensor) -> dict:
    batch, height, width, chans = residual.shape
    return dict(B=batch, h=tokens.shape[1], w=tokens.shape[2], H=height, W=width, C=chans)


@torch.library.custom_op("fastctx::upsample_add", mutates_args=())
def _upsample_add(tokens: torch.Tensor, residual: torch.Tensor, backend: str) -> torch.Tensor:
    backend = OP.resolve(backend, residual.device, residual.dtype, _facts(tokens, residual))
    if residual.numel() == 0:
        return torch.empty_like(residual, memory_format=torch.contiguous_format)
    if backend == "reference":
        return reference_forward(_reference, [tokens, residual])
    return OP.kernels(backend).upsample_add_fwd(tokens.contiguous(), residual.contiguous())


@_upsample_add.register_fake
def _(tokens, residual, backend):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastctx::upsample_add_backward", mutates_args=())
def _upsample_add_backward(grad: torch.Tensor, height: int, width: int, backend: str) -> torch.Tensor:
    batch, big_h, big_w, chans = grad.shape
    facts = dict(B=batch, h=height, w=width, H=big_h, W=big_w, C=chans)
    backend = OP.resolve(backend, grad.device, grad.dtype, facts)
    if grad.numel() == 0 or batch * chans == 0:
        return grad.new_zeros(batch, height, width, chans)
    if backend == "reference":
        with torch.autocast(grad.device.type if grad.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            _, pullback = torch.func.vjp(lambda t: upsample(t, grad.shape[1:3]),
                                         grad.new_zeros(batch, height, width, chans))
            return pullback(grad.contiguous())[0].contiguous()
    return OP.kernels(backend).upsample_add_bwd(grad.contiguous(), height, width)


@_upsample_add_backward.register_fake
def _(grad, height, width, backend):
    return grad.new_empty(grad.shape[0], height, width, grad.shape[3])


def _setup_context(ctx, inputs, output):
    tokens, residual, backend = inputs
    ctx.grid, ctx.backend = tuple(tokens.shape[1:3]), backend


def _backward(ctx, grad):
    grad_tokens = _upsample_add_backward(grad, *ctx.grid, ctx.backend) if ctx.needs_input_grad[0] else None
    return grad_tokens, grad, None  # d residual = grad: no copy


_upsample_add.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, height, width, backend = inputs
    ctx.size = tuple(grad.shape[1:3])


def _double_backward(ctx, grad_grad_tokens):
    # The backward is U^T grad, linear in grad: its adjoint is the upsampling U (reference maths).
    return upsample(grad_grad_tokens, ctx.size), None, None, None


_upsample_add_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


def upsample_add(tokens: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + bilinear upsample (align_corners=True) of tokens to residual's size, channels last.

    Args:
        tokens: [B, h, w, C] (IIWA's inter-window attention output on the token grid).
        residual: [B, H, W, C] (IIWA's residual stream on the padded map).
    Returns [B, H, W, C] in the promoted dtype of the two (as the eager `residual + up`).
    Differentiable w.r.t. both.
    """
    check_tensor(tokens, "tokens", 4, "of shape [B, h, w, C] (channels last)")
    check_tensor(residual, "residual", 4, "of shape [B, H, W, C] (channels last)")
    amp = amp_dtype(residual) or amp_dtype(tokens)
    check_same({"tokens": tokens, "residual": residual}, same_dtype=amp is None)
    if tokens.shape[0] != residual.shape[0] or tokens.shape[3] != residual.shape[3]:
        raise ValueError(f"tokens [B, h, w, C] and residual [B, H, W, C] must have the same B and C, got "
                         f"{tuple(tokens.shape)} and {tuple(residual.shape)}")
    if min(tokens.shape[1:3]) < 1 or min(residual.shape[1:3]) < 1:
        raise ValueError(f"tokens and residual must have height and width >= 1, got {tuple(tokens.shape)} and "
                         f"{tuple(residual.shape)}")
    compute = torch.promote_types(tokens.dtype, residual.dtype)
    backend = OP.wrapper_backend(residual.device, compute, _facts(tokens, residual))
    if backend == "reference" and residual.shape[0] > 0:
        return _reference(tokens, residual)
    return _upsample_add(tokens.to(compute), residual.to(compute), backend)
