"""EncNet's Encoding layer, fused: scaled-L2 assignment + softmax + residual aggregation.

    L[b, i, k] = s_k ||x_i - c_k||^2,   A = softmax_k(L),   E[b, k] = sum_i A[b, i, k] (x_i - c_k)

The fused backends never build mmseg's [B, N, K, D] tensors: the [N, K]
assignment exists per pixel tile only and is recomputed in the backward.

Backends: reference (fastctx/reference/encoding.py), cpu (csrc/cpu/encoding.cpp), cuda
(csrc/cuda/encoding.cu), triton (kernels/encoding.py). Contract: docs/kernels.md.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference.encoding import encoding as _reference
from ..reference.encoding import encoding_two_gemm as _reference_two_gemm
from ._checks import check_same, check_tensor
from ._dispatch import (FusedOp, Support, amp_dtype, compute_dtype, custom_op, reference_backward, reference_forward,
                        reference_second_order, register)

# The CUDA kernels hold the codebook in one register/shared-memory tile.
CUDA_MAX_CODES = 64


def _cuda_limits(facts):
    if facts["K"] > CUDA_MAX_CODES:
        return f"K = {facts['K']} codewords > {CUDA_MAX_CODES} (the codewords are one tile)"
    if facts["sm"] < 80:
        return (f"the CUDA backward needs 86-89 KiB of shared memory per block; sm_{facts['sm']} allows 64 KiB "
                "(sm_80 and newer run it)")
    if facts["B"] > 65535:
        return f"batch = {facts['B']} > 65535 (grid axis 1)"
    return None


def _triton_limits(facts):
    from fastctx.kernels.encoding import limits

    return limits(facts)


OP = register(FusedOp(
    "encoding",
    cpu=Support(),
    cuda=Support(limits=_cuda_limits, note=f"K <= {CUDA_MAX_CODES}, B <= 65535, sm_80+"),
    triton=Support(limits=_triton_limits, note="K <= 64, B <= 65535, N*D < 2^31"),
))


def _facts(x: torch.Tensor, codewords: torch.Tensor, channels_first: bool) -> dict:
    return dict(B=x.shape[0], N=x.shape[2] if channels_first else x.shape[1], K=codewords.shape[0],
                D=codewords.shape[1])


def _reference_pixels(x, codewords, scale, channels_first: bool):
    """The reference maths on the op's layouts ([B, D, N] read as [B, N, D] pixels when channels_first)."""
    return _reference(x.transpose(1, 2) if channels_first else x, codewords, scale)


def _two_gemm_pixels(x, codewords, scale, channels_first: bool):
    """The same maths without [B, N, K, D] tensors: the second-order backward's reference."""
    return _reference_two_gemm(x.transpose(1, 2) if channels_first else x, codewords, scale)


@custom_op("fastctx::encoding")
def _encoding(x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor, channels_first: bool,
              backend: str) -> torch.Tensor:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, codewords, channels_first))
    batch = x.shape[0]
    num_codes, channels = codewords.shape
    pixels = x.shape[2] if channels_first else x.shape[1]
    if batch == 0 or pixels == 0:
        # no pixels: every sum is empty
        return x.new_zeros(batch, num_codes, channels)
    if backend == "reference":
        return reference_forward(_reference_pixels, [x, codewords, scale], channels_first)
    return OP.kernels(backend).encoding_fwd(x.contiguous(), codewords.contiguous(), scale.contiguous(),
                                            channels_first)


@_encoding.register_fake
def _(x, codewords, scale, channels_first, backend):
    return x.new_empty(x.shape[0], codewords.shape[0], codewords.shape[1])


@custom_op("fastctx::encoding_backward")
def _encoding_backward(grad: torch.Tensor, x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor,
                       channels_first: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, codewords, channels_first))
    pixels = x.shape[2] if channels_first else x.shape[1]
    if x.shape[0] == 0 or pixels == 0:
        return (torch.zeros_like(x, memory_format=torch.contiguous_format), torch.zeros_like(codewords),
                torch.zeros_like(scale))
    if backend == "reference":
        return reference_backward(_reference_pixels, [x, codewords, scale], grad, channels_first)
    return OP.kernels(backend).encoding_bwd(grad.contiguous(), x.contiguous(), codewords.contiguous(),
                                            scale.contiguous(), channels_first)


@_encoding_backward.register_fake
def _(grad, x, codewords, scale, channels_first, backend):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(codewords),
            torch.empty_like(scale))


def _setup_context(ctx, inputs, output):
    x, codewords, scale, channels_first, backend = inputs
    ctx.save_for_backward(x, codewords, scale)
    ctx.channels_first, ctx.backend = channels_first, backend


def _backward(ctx, grad):
    x, codewords, scale = ctx.saved_tensors
    return (*_encoding_backward(grad, x, codewords, scale, ctx.channels_first, ctx.backend), None, None)


_encoding.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, x, codewords, scale, channels_first, backend = inputs
    ctx.save_for_backward(grad, x, codewords, scale)
    ctx.channels_first = channels_first


def _double_backward(ctx, *grad_grads):
    grad, *tensors = ctx.saved_tensors
    return (*reference_second_order(_two_gemm_pixels, grad, tensors, grad_grads, ctx.channels_first), None, None)


_encoding_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# FLOPs of the fused kernels' products for torch.utils.flop_counter.FlopCounterMode (2 per
# multiply-add; the softmax counts 0, as in torch's own formulas), in units of one
# [N x K] by [K x D] product: the logits X C^T and A^T X forward; the backward recomputes
# the logits with dE X^T (2), then grad_x = A dE + (2 s dL) C (2) and grad_codewords' dL^T X (1).
# mmseg's eager form broadcasts [B, N, K, D] residuals instead of multiplying matrices.
def _encoding_product(x_shape, codewords_shape) -> int:
    """FLOPs of one product: 2 B N K D (x holds B N D elements in either layout)."""
    elements = 1
    for size in x_shape:
        elements *= size
    return 2 * elements * codewords_shape[0]


@register_flop_formula(torch.ops.fastctx.encoding)
def _encoding_flops(x, codewords, *args, **kwargs) -> int:
    return 2 * _encoding_product(x, codewords)


@register_flop_formula(torch.ops.fastctx.encoding_backward)
def _encoding_backward_flops(grad, x, codewords, *args, **kwargs) -> int:
    return 5 * _encoding_product(x, codewords)


def encoding(x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Encoding layer E [B, K, D] of features x.

    Args:
        x: [B, D, H, W] feature map (read in place, no transpose copy) or [B, N, D] pixels
            (PyTorch-Encoding's functional convention; a 3-D tensor is always read as [B, N, D]).
        codewords: [K, D].
        scale: [K] smoothing factors (mmseg initialises them in [-1, 0)).
    Inside autocast the inputs may have mixed float dtypes and E has the
    autocast dtype (CPU: computed by the fp32 kernel; CUDA: by the kernels in
    the autocast dtype, accumulating in fp32).
    """
    check_tensor(x, "x", (3, 4), "of shape [B, D, H, W] or [B, N, D]")
    check_tensor(codewords, "codewords", 2, "of shape [K, D]")
    check_tensor(scale, "scale", 1, "of shape [K]")
    amp = amp_dtype(x)
    check_same({"x": x, "codewords": codewords, "scale": scale}, same_dtype=amp is None)
    num_codes, channels = codewords.shape
    channels_first = x.dim() == 4
    x_channels = x.shape[1] if channels_first else x.shape[2]
    if x_channels != channels:
        layout = "[B, D, H, W]" if channels_first else "[B, N, D]"
        raise ValueError(f"x {layout} has D = {x_channels} channels but codewords are [K, D] = {tuple(codewords.shape)}")
    if scale.shape != (num_codes,):
        raise ValueError(f"scale must have shape ({num_codes},) for {num_codes} codewords, got {tuple(scale.shape)}")
    if num_codes == 0 or channels == 0:
        raise ValueError(f"codewords must be non-empty, got shape {tuple(codewords.shape)}")
    compute = x.dtype if amp is None else compute_dtype(x.device, amp)
    pixels = x.flatten(2) if channels_first else x  # [B, D, N] view of an NCHW map
    backend = OP.wrapper_backend(x.device, compute, _facts(pixels, codewords, channels_first))
    if backend == "reference":
        return _reference(x, codewords, scale)
    x, codewords, scale = x.to(compute), codewords.to(compute), scale.to(compute)  # no-ops outside autocast
    if channels_first and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # a channels_last map is [B, N, D] pixels in memory: read it as such, no copy
        out = _encoding(x.permute(0, 2, 3, 1).flatten(1, 2), codewords, scale, False, backend)
    else:
        out = _encoding(x.flatten(2) if channels_first else x, codewords, scale, channels_first, backend)
    return out if amp is None else out.to(amp)
