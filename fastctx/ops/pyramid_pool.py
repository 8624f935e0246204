"""Pyramid pooling: adaptive average pools of x at several scales from one read of x.

Backends: reference (fastctx/reference/pyramid_pool.py), cpu (csrc/cpu/pyramid_pool.cpp), cuda
(csrc/cuda/pyramid_pool.cu), triton (kernels/pyramid_pool.py). Contract: docs/kernels.md.
"""
from __future__ import annotations

import torch

from ..reference.pyramid_pool import pyramid_pool as _reference
from ._checks import check_pool_scales, check_tensor
from ._dispatch import (FusedOp, Support, amp_dtype, compute_dtype, custom_op, reference_backward, reference_forward,
                        register)


def _triton_limits(facts):
    from fastctx.kernels.pyramid_pool import limits

    return limits(facts)


OP = register(FusedOp(
    "pyramid_pool",
    cpu=Support(),
    cuda=Support(),
    triton=Support(limits=_triton_limits, note="B <= 65535"),
))


def _facts(x: torch.Tensor, scales) -> dict:
    return dict(B=x.shape[0], C=x.shape[1], N=x.shape[2] * x.shape[3], S=sum(s * s for s in scales))


@custom_op("fastctx::pyramid_pool")
def _pyramid_pool(x: torch.Tensor, scales: list[int], backend: str) -> torch.Tensor:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, scales))
    if x.shape[0] == 0 or x.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[1], sum(s * s for s in scales))
    if backend == "reference":
        return reference_forward(_reference, [x], scales)
    return OP.kernels(backend).pyramid_pool_fwd(x.contiguous(), scales)


@_pyramid_pool.register_fake
def _(x, scales, backend):
    return x.new_empty(x.shape[0], x.shape[1], sum(s * s for s in scales))


@custom_op("fastctx::pyramid_pool_backward")
def _pyramid_pool_backward(
    grad: torch.Tensor, scales: list[int], height: int, width: int, backend: str
) -> torch.Tensor:
    like = grad.new_zeros(grad.shape[0], grad.shape[1], height, width)  # pooling is linear: only the shape matters
    backend = OP.resolve(backend, grad.device, grad.dtype, _facts(like, scales))
    if grad.shape[0] == 0 or grad.shape[1] == 0:
        return like
    if backend == "reference":
        return reference_backward(_reference, [like], grad, scales)[0]
    return OP.kernels(backend).pyramid_pool_bwd(grad.contiguous(), scales, height, width)


@_pyramid_pool_backward.register_fake
def _(grad, scales, height, width, backend):
    return grad.new_empty(grad.shape[0], grad.shape[1], height, width)


def _setup_context(ctx, inputs, output):
    x, scales, backend = inputs
    ctx.scales, ctx.backend, ctx.size = scales, backend, (x.shape[2], x.shape[3])


def _backward(ctx, grad):
    height, width = ctx.size
    return _pyramid_pool_backward(grad, ctx.scales, height, width, ctx.backend), None, None


_pyramid_pool.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, scales, height, width, backend = inputs
    ctx.scales, ctx.backend = scales, backend


def _double_backward(ctx, grad_grad_x):
    # The backward is linear in grad and its adjoint is the forward: pooling again.
    return _pyramid_pool(grad_grad_x, ctx.scales, ctx.backend), None, None, None, None


_pyramid_pool_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


def pyramid_pool(x: torch.Tensor, scales=(1, 2, 3, 6)) -> torch.Tensor:
    """Adaptive average pooling of `x` [B, C, H, W] to every scale in `scales`.

    Returns [B, C, sum(s*s)]: scale i's s*s bins, row-major, at offset
    sum_{j<i} s_j^2. Bin edges are exactly `F.adaptive_avg_pool2d`'s (bins
    overlap when H or W is not a multiple of s). `scales` are integers from 1
    to 4 * max(H, W) (a scale may exceed the map: its bins then repeat
    pixels). The fused backends read x once for all scales. Under autocast the
    result keeps x's dtype (as `adaptive_avg_pool2d` does); on CPU the fp32
    kernel computes it.
    """
    check_tensor(x, "x", 4, "of shape [B, C, H, W]")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must have a non-empty spatial size, got shape {tuple(x.shape)}")
    scales = check_pool_scales(scales, x.shape[2], x.shape[3])
    amp = amp_dtype(x)
    compute = x.dtype if amp is None else compute_dtype(x.device, amp)
    backend = OP.wrapper_backend(x.device, compute, _facts(x, scales))
    if backend == "reference":
        return _reference(x, scales)
    return _pyramid_pool(x.to(compute), scales, backend).to(x.dtype)


def split_scales(pooled: torch.Tensor, scales) -> list[torch.Tensor]:
    """Views [B, C, s, s] of each scale's bins in pyramid_pool's output."""
    out, offset = [], 0
    for s in scales:
        out.append(pooled[:, :, offset:offset + s * s].unflatten(2, (s, s)))
        offset += s * s
    return out
