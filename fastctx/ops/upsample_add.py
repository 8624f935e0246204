"""IIWA's upsample + residual: residual + bilinear upsample (align_corners=True) of a token grid, channels last,
and the same sum with the LayerNorm that reads it (upsample_add_layer_norm).

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

upsample_add_layer_norm(tokens, residual, weight, bias, eps) -> (out, normed):
out as above and normed = layer_norm(out) over C, in one pass (eager writes
out, then reads it back for the norm). The statistics are the stored out's;
the backward reads out, the saved per-pixel mean and rstd, and both incoming
gradients once, writes grad_sum = grad_out + the norm's input gradient
(grad_residual itself; grad_tokens = U^T grad_sum as above) and reduces
d weight, d bias in a fixed order. Its own backward is the reference maths
(LayerNorm's, from the saved sum). Lives in this op's files
(FusedOp(home="upsample_add")): its kernels are the sum's plus an epilogue.

Backends: reference (fastctx/reference/upsample_add.py), cpu (csrc/cpu/upsample_add.cpp),
cuda (csrc/cuda/upsample_add.cu), triton (kernels/upsample_add.py). Contract: docs/kernels.md "upsample_add".
"""
from __future__ import annotations

import torch

from ..reference.upsample_add import upsample
from ..reference.upsample_add import upsample_add as _reference
from ..reference.upsample_add import upsample_add_layer_norm as _reference_layer_norm
from ._checks import check_same, check_tensor
from ._dispatch import (FusedOp, Support, acc_dtype, amp_dtype, custom_op, reference_forward, reference_second_order,
                        register)


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
                      triton=Support(limits=_triton_limits, note="B*H*W <= 2^31 - 2048")))


def _facts(tokens: torch.Tensor, residual: torch.Tensor) -> dict:
    batch, height, width, chans = residual.shape
    return dict(B=batch, h=tokens.shape[1], w=tokens.shape[2], H=height, W=width, C=chans)


@custom_op("fastctx::upsample_add")
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


@custom_op("fastctx::upsample_add_backward")
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


# ----------------------------------------------------------------------------- upsample_add_layer_norm

def _triton_layer_norm_limits(facts):
    from fastctx.kernels.upsample_add import layer_norm_limits

    return layer_norm_limits(facts)


LN_OP = register(FusedOp("upsample_add_layer_norm", home="upsample_add",
                         cpu=Support(dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16)}),
                         cuda=Support(limits=_cuda_limits, note="B*H*W, B*h*w < 2^31"),
                         triton=Support(limits=_triton_layer_norm_limits, note="B*H*W <= 2^31 - 2048, C <= 8192")))


def _stats_reference(tokens, residual, weight, bias, eps):
    """(out, normed, mean, rstd) from the eager maths: the reference backend and empty calls."""
    out = _reference(tokens, residual)
    normed, mean, rstd = torch.native_layer_norm(out, [out.shape[-1]], weight, bias, eps)
    stat = acc_dtype(out.dtype)
    return out, normed, mean.to(stat).reshape(out.shape[:3]), rstd.to(stat).reshape(out.shape[:3])


@custom_op("fastctx::upsample_add_layer_norm")
def _upsample_add_layer_norm(tokens: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                             bias: torch.Tensor | None, eps: float,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = LN_OP.resolve(backend, residual.device, residual.dtype, _facts(tokens, residual))
    if backend == "reference" or residual.numel() == 0:
        return reference_forward(_stats_reference, [tokens, residual], weight, bias, eps)
    return LN_OP.kernels(backend).upsample_add_layer_norm_fwd(
        tokens.contiguous(), residual.contiguous(), *(None if t is None else t.contiguous() for t in (weight, bias)),
        eps)


@_upsample_add_layer_norm.register_fake
def _(tokens, residual, weight, bias, eps, backend):
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    stat = residual.new_empty(residual.shape[:3], dtype=acc_dtype(residual.dtype))
    return out, torch.empty_like(out), stat, torch.empty_like(stat)


def _norm_of(weight, bias, eps):
    """layer_norm over C as a function of (x, *the present ones of weight, bias), for torch.func."""
    def norm(x, *affine):
        it = iter(affine)
        w, b = (next(it) if t is not None else None for t in (weight, bias))
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)

    return norm


@custom_op("fastctx::upsample_add_layer_norm_backward")
def _upsample_add_layer_norm_backward(
    grad_out: torch.Tensor, grad_normed: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, affine_grads: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, height, width, chans = out.shape
    facts = dict(B=batch, h=1, w=1, H=height, W=width, C=chans)  # the norm's backward never reads the grid
    backend = LN_OP.resolve(backend, out.device, out.dtype, facts)
    empty = out.new_empty(0)
    if backend == "reference" or out.numel() == 0:
        with torch.autocast(out.device.type if out.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            present = [t for t in (out, weight, bias) if t is not None]
            _, pullback = torch.func.vjp(_norm_of(weight, bias, eps), *present)
            grads = iter(pullback(grad_normed.contiguous()))
        grad_sum = (grad_out + next(grads)).contiguous()
        d_weight, d_bias = (next(grads).contiguous() if t is not None else None for t in (weight, bias))
    else:
        grad_sum, d_weight, d_bias = LN_OP.kernels(backend).upsample_add_layer_norm_bwd(
            grad_out.contiguous(), grad_normed.contiguous(), out.contiguous(), mean.contiguous(), rstd.contiguous(),
            None if weight is None else weight.contiguous(), affine_grads)
    # [C] where asked for and the parameter exists, else empty (the fake kernel's shapes; two tensors: outputs
    # may not alias)
    return (grad_sum, d_weight if affine_grads and weight is not None else empty,
            d_bias if affine_grads and bias is not None else out.new_empty(0))


@_upsample_add_layer_norm_backward.register_fake
def _(grad_out, grad_normed, out, mean, rstd, weight, bias, eps, affine_grads, backend):
    chans = out.shape[-1]
    return (torch.empty_like(out, memory_format=torch.contiguous_format),
            out.new_empty(chans if affine_grads and weight is not None else 0),
            out.new_empty(chans if affine_grads and bias is not None else 0))


def _setup_layer_norm_context(ctx, inputs, output):
    tokens, residual, weight, bias, eps, backend = inputs
    out, normed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(out, mean, rstd, weight, bias)
    ctx.grid, ctx.eps, ctx.backend = tuple(tokens.shape[1:3]), eps, backend


def _layer_norm_backward(ctx, grad_out, grad_normed, _grad_mean, _grad_rstd):
    out, mean, rstd, weight, bias = ctx.saved_tensors
    affine_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grad_sum, d_weight, d_bias = _upsample_add_layer_norm_backward(
        grad_out, grad_normed, out, mean, rstd, weight, bias, ctx.eps, affine_grads, ctx.backend)
    grad_tokens = _upsample_add_backward(grad_sum, *ctx.grid, ctx.backend) if ctx.needs_input_grad[0] else None
    return (grad_tokens, grad_sum, d_weight if ctx.needs_input_grad[2] else None,
            d_bias if ctx.needs_input_grad[3] else None, None, None)


_upsample_add_layer_norm.register_autograd(_layer_norm_backward, setup_context=_setup_layer_norm_context)


def _setup_layer_norm_backward_context(ctx, inputs, output):
    grad_out, grad_normed, out, mean, rstd, weight, bias, eps, affine_grads, backend = inputs
    ctx.save_for_backward(grad_normed, out, weight, bias)
    ctx.eps = eps


def _layer_norm_double_backward(ctx, gg_sum, gg_weight, gg_bias):
    # grad_sum = grad_out + the vjp of layer_norm at out: its derivative is the reference maths', with the
    # statistics recomputed from out (mean and rstd are functions of out, not inputs of their own).
    grad_normed, out, weight, bias = ctx.saved_tensors
    pairs = [(out, gg_sum), (weight, gg_weight), (bias, gg_bias)]
    present = [t for t, _ in pairs if t is not None]
    grad_grads = [None if gg is None or gg.numel() == 0 else gg for t, gg in pairs if t is not None]
    d_grad_normed, *d_present = reference_second_order(_norm_of(weight, bias, ctx.eps), grad_normed, present,
                                                       grad_grads)
    it = iter(d_present)
    d_out, d_weight, d_bias = (next(it) if t is not None else None for t, _ in pairs)
    return gg_sum, d_grad_normed, d_out, None, None, d_weight, d_bias, None, None, None


_upsample_add_layer_norm_backward.register_autograd(_layer_norm_double_backward,
                                                    setup_context=_setup_layer_norm_backward_context)


def upsample_add_layer_norm(tokens: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, normed): out = upsample_add(tokens, residual), normed = layer_norm(out) over C, in one pass.

    IIWA's `x = shortcut + interpolate(xg); x = x + proj2(x)` computes proj2's LayerNorm from that sum;
    this op writes the sum and its normalisation together instead of reading the sum back.

    Args:
        tokens: [B, h, w, C]; residual: [B, H, W, C] (channels last), as upsample_add.
        weight, bias: the LayerNorm's affine parameters [C] (None: 1 and 0), in the data's dtype.
        eps: the LayerNorm's eps.
    Returns (out, normed), both [B, H, W, C]. Differentiable (twice) w.r.t. tokens, residual, weight and bias.
    Inside autocast, or when weight / bias have another dtype than the data, it computes eager's
    `out = upsample_add(...)` then `F.layer_norm(out, ...)`, with their dtype rules (autocast's for
    layer_norm on the device).
    """
    check_tensor(tokens, "tokens", 4, "of shape [B, h, w, C] (channels last)")
    check_tensor(residual, "residual", 4, "of shape [B, H, W, C] (channels last)")
    chans = residual.shape[3]
    if chans < 1:
        raise ValueError(f"upsample_add_layer_norm normalises over C, which must be >= 1, got residual "
                         f"{tuple(residual.shape)}")
    affine = {name: t for name, t in (("weight", weight), ("bias", bias)) if t is not None}
    for name, t in affine.items():
        check_tensor(t, name, 1, f"of shape [C] = [{chans}]")
        if t.shape[0] != chans:
            raise ValueError(f"{name} must be of shape [C] = [{chans}], got {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if tokens.shape[0] != residual.shape[0] or tokens.shape[3] != chans:
        raise ValueError(f"tokens [B, h, w, C] and residual [B, H, W, C] must have the same B and C, got "
                         f"{tuple(tokens.shape)} and {tuple(residual.shape)}")
    if min(tokens.shape[1:3]) < 1 or min(residual.shape[1:3]) < 1:
        raise ValueError(f"tokens and residual must have height and width >= 1, got {tuple(tokens.shape)} and "
                         f"{tuple(residual.shape)}")
    amp = amp_dtype(residual) or amp_dtype(tokens)
    check_same({"tokens": tokens, "residual": residual}, same_dtype=amp is None)
    check_same({"residual": residual, **affine}, same_dtype=False)
    compute = torch.promote_types(tokens.dtype, residual.dtype)
    if amp is not None or any(t.dtype != compute for t in affine.values()):
        # eager's dtype rules (autocast runs layer_norm in float32; mixed affine dtypes are its call)
        out = upsample_add(tokens, residual)
        return out, torch.nn.functional.layer_norm(out, (chans,), weight, bias, eps)
    backend = LN_OP.wrapper_backend(residual.device, compute, _facts(tokens, residual))
    if backend == "reference" and residual.shape[0] > 0:
        return _reference_layer_norm(tokens, residual, weight, bias, float(eps))
    out, normed, _, _ = _upsample_add_layer_norm(tokens, residual, weight, bias, float(eps), backend)
    return out, normed
