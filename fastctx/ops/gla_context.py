"""GLA context of APCNet's Adaptive Context Module, every pool scale in one op.

    z_g = sigmoid(x_g^T W_g^T + bias_g) P_g        (per group g = pool scale)

The [B, H*W, S] affinity is never stored: the fused backends compute it per
pixel tile and recompute it in the backward. `bias` is the per-image logit bias
`W (global context) + b_gla` (the global term of `gla(x + g)` is a bias), so
gradients reach the global context through it.

Backends: reference (fastctx/reference/gla_context.py), cpu (csrc/cpu/gla_context.cpp), cuda
(csrc/cuda/gla_context.cu), triton (kernels/gla_context.py). Contract: docs/kernels.md.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference.gla_context import gla_context as _reference
from ._checks import check_int_list, check_same, check_tensor
from ._dispatch import (FusedOp, Support, amp_dtype, compute_dtype, custom_op, reference_backward, reference_forward,
                        reference_second_order, register)

# What the CUDA kernels hold: the group table lives in kernel parameters, a group's
# [rows x pixels] affinity tile in shared memory.
CUDA_MAX_GROUPS, CUDA_MAX_GROUP_SIZE = 16, 192


def _cuda_limits(facts):
    if facts["G"] > CUDA_MAX_GROUPS:
        return f"{facts['G']} groups > {CUDA_MAX_GROUPS} (the CUDA kernels' group table)"
    if facts["S_max"] > CUDA_MAX_GROUP_SIZE:
        return f"a group of {facts['S_max']} bins > {CUDA_MAX_GROUP_SIZE} (the CUDA kernels' affinity tile)"
    if facts["B"] > 65535:
        return f"batch = {facts['B']} > 65535 (grid axis 2)"
    if facts["sm"] < 80 and facts["S_max"] > 36:
        return (f"a group of {facts['S_max']} bins needs more than the 64 KiB of shared memory per block of "
                f"sm_{facts['sm']} in the CUDA backward (groups up to 36 bins fit)")
    return None


def _triton_limits(facts):
    from fastctx.kernels.gla_context import limits

    return limits(facts)


OP = register(FusedOp(
    "gla_context",
    cpu=Support(),
    cuda=Support(limits=_cuda_limits,
                 note=f"G <= {CUDA_MAX_GROUPS}, S_g <= {CUDA_MAX_GROUP_SIZE} (36 below sm_80), B <= 65535"),
    triton=Support(limits=_triton_limits, note="G, B <= 65535"),
))


def _facts(x: torch.Tensor, group_sizes) -> dict:
    return dict(B=x.shape[0], C=x.shape[1], N=x.shape[2] * x.shape[3], G=len(group_sizes), S_max=max(group_sizes))


@custom_op("fastctx::gla_context")
def _gla_context(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pooled: torch.Tensor,
    group_sizes: list[int], backend: str,
) -> torch.Tensor:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, group_sizes))
    if x.shape[0] == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if backend == "reference":
        return reference_forward(_reference, [x, weight, bias, pooled], group_sizes)
    return OP.kernels(backend).gla_context_fwd(
        x.contiguous(), weight.contiguous(), bias.contiguous(), pooled.contiguous(), group_sizes
    )


@_gla_context.register_fake
def _(x, weight, bias, pooled, group_sizes, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("fastctx::gla_context_backward")
def _gla_context_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    pooled: torch.Tensor, group_sizes: list[int], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, group_sizes))
    if x.shape[0] == 0:
        return (torch.zeros_like(x, memory_format=torch.contiguous_format), torch.zeros_like(weight),
                bias.new_zeros(bias.shape), pooled.new_zeros(pooled.shape))
    if backend == "reference":
        return reference_backward(_reference, [x, weight, bias, pooled], grad, group_sizes)
    return OP.kernels(backend).gla_context_bwd(
        grad.contiguous(), x.contiguous(), weight.contiguous(), bias.contiguous(),
        pooled.contiguous(), group_sizes,
    )


@_gla_context_backward.register_fake
def _(grad, x, weight, bias, pooled, group_sizes, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(pooled))


def _setup_context(ctx, inputs, output):
    x, weight, bias, pooled, group_sizes, backend = inputs
    ctx.save_for_backward(x, weight, bias, pooled)
    ctx.group_sizes, ctx.backend = group_sizes, backend


def _backward(ctx, grad):
    x, weight, bias, pooled = ctx.saved_tensors
    grads = _gla_context_backward(grad, x, weight, bias, pooled, ctx.group_sizes, ctx.backend)
    return (*grads, None, None)


_gla_context.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, x, weight, bias, pooled, group_sizes, backend = inputs
    ctx.save_for_backward(grad, x, weight, bias, pooled)
    ctx.group_sizes = group_sizes


def _double_backward(ctx, *grad_grads):
    # Second order from the reference maths: the vector-Jacobian product of its first-order vjp.
    grad, *tensors = ctx.saved_tensors
    return (*reference_second_order(_reference, grad, tensors, grad_grads, ctx.group_sizes), None, None)


_gla_context_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# FLOPs of the fused kernels' products for torch.utils.flop_counter.FlopCounterMode (2 per
# multiply-add; the sigmoid counts 0, as in torch's own formulas): the logits W x and z = A P
# forward; the backward recomputes the logits, then dA, grad_x, grad_weight and grad_pooled:
# one product more than the eager backward.
def _gla_context_product(x_shape, weight_shape) -> int:
    """FLOPs of one product over every group: 2 B N C S_tot."""
    b, _, h, w = x_shape
    s_tot, c = weight_shape
    return 2 * b * h * w * c * s_tot


@register_flop_formula(torch.ops.fastctx.gla_context)
def _gla_context_flops(x, weight, *args, **kwargs) -> int:
    return 2 * _gla_context_product(x, weight)


@register_flop_formula(torch.ops.fastctx.gla_context_backward)
def _gla_context_backward_flops(grad, x, weight, *args, **kwargs) -> int:
    return 5 * _gla_context_product(x, weight)


def gla_context(x, weight, bias, pooled, group_sizes) -> torch.Tensor:
    """Affinity-weighted context of the Adaptive Context Module for G groups at once.

    Args:
        x: [B, G*C, H, W] reduced features; group g owns channels [g*C, (g+1)*C).
        weight: [S_tot, C] `gla` 1x1 conv weights of all groups, stacked
            (group g's S_g rows at offset sum_{j<g} S_j).
        bias: [B, S_tot] per-image logit bias (W_g g_b + b_gla).
        pooled: [B, C, S_tot] pooled sub-region features of all groups.
        group_sizes: (S_0, ..., S_{G-1}), e.g. (1, 4, 9, 36) for scales (1, 2, 3, 6).
    Returns:
        z [B, G*C, H, W] with z_g[b, :, n] = sum_k sigmoid(L[b, n, k]) pooled[b, :, k].
        Inside autocast the inputs may have mixed float dtypes and z has the
        autocast dtype, as the matmul it replaces would (CPU: computed by the
        fp32 kernel; CUDA: by the kernels in the autocast dtype).
    """
    check_tensor(x, "x", 4, "of shape [B, G*C, H, W]")
    check_tensor(weight, "weight", 2, "of shape [S_tot, C]")
    check_tensor(bias, "bias", 2, "of shape [B, S_tot]")
    check_tensor(pooled, "pooled", 3, "of shape [B, C, S_tot]")
    amp = amp_dtype(x)
    check_same({"x": x, "weight": weight, "bias": bias, "pooled": pooled}, same_dtype=amp is None)
    group_sizes = check_int_list(group_sizes, "group_sizes")
    batch, channels_all, height, width = x.shape
    groups, total = len(group_sizes), sum(group_sizes)
    if channels_all % groups:
        raise ValueError(f"x has {channels_all} channels, not a multiple of the {groups} groups")
    channels = channels_all // groups
    expected = {"weight": (total, channels), "bias": (batch, total), "pooled": (batch, channels, total)}
    for name, t in (("weight", weight), ("bias", bias), ("pooled", pooled)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for x {tuple(x.shape)} and group_sizes "
                f"{group_sizes} (C = {channels}, S_tot = {total}), got {tuple(t.shape)}"
            )
    if height == 0 or width == 0:
        raise ValueError(f"x must have a non-empty spatial size, got shape {tuple(x.shape)}")
    compute = x.dtype if amp is None else compute_dtype(x.device, amp)
    backend = OP.wrapper_backend(x.device, compute, _facts(x, group_sizes))
    if backend == "reference":
        return _reference(x, weight, bias, pooled, group_sizes)
    z = _gla_context(x.to(compute), weight.to(compute), bias.to(compute), pooled.to(compute), group_sizes, backend)
    return z if amp is None else z.to(amp)
