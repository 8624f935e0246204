"""IIWA's window tokens: the mean of each Wh x Ww window of a channels-last map, plus their positional encoding.

x [B, Hp, Wp, C] (Hp, Wp multiples of the window: the map IIWA has padded) ->
tokens [B, Hg, Wg, C] = AvgPool2d(window)(x) + pos, with pos [Hg, Wg, C] (the
sine encoding of the token grid, which has no parameters: the module caches
it) cast to x's dtype and added to every image, as the released ULLMC code
does. The fused kernels read x once along C (no permuted copies) and add pos
in the same pass.

Backward: grad_x = grad_tokens / (Wh*Ww) broadcast over each window (a
gather), grad_pos = the sum of grad_tokens over the batch, in batch order. Both
are linear in grad_tokens, so the backward's own backward is this op again
(here through the reference maths).

Not an autocast op (eager avg_pool2d and add keep their dtypes): the kernels
run in x's dtype (the CPU kernel has a bfloat16 path, summing in fp32).

Backends: reference (fastctx/reference/window_pool.py), cpu (csrc/cpu/window_pool.cpp),
cuda (csrc/cuda/window_pool.cu), triton (kernels/window_pool.py). Contract: docs/kernels.md "window_pool".
"""
from __future__ import annotations

import torch

from ..reference.window_pool import window_pool as _reference
from ..reference.window_pool import window_size
from ._checks import check_same, check_tensor
from ._dispatch import FusedOp, Support, custom_op, reference_backward, reference_forward, register

def _triton_limits(facts):
    from fastctx.kernels.window_pool import limits

    return limits(facts)


def _cuda_limits(facts):
    """The CUDA kernels index pixels, tokens and channels in int32 (csrc/cuda/window_pool_launch.h)."""
    pixels = facts["B"] * facts["H"] * facts["W"]
    if pixels >= 2**31:
        return f"B*H*W = {pixels} map pixels >= 2^31 (int32 pixel indices); split the batch"
    if facts["C"] > 2**30:
        return f"C = {facts['C']} channels > 2^30"
    return None


OP = register(FusedOp("window_pool",
                      cpu=Support(dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16)}),
                      cuda=Support(limits=_cuda_limits, note="B*H*W < 2^31"),
                      triton=Support(limits=_triton_limits, note="B*H*W < 2^31")))


def _facts(x: torch.Tensor, window) -> dict:
    batch, height, width, chans = x.shape
    return dict(B=batch, H=height, W=width, C=chans, Wh=window[0], Ww=window[1])


def _reference_of(window, has_pos: bool):
    return (lambda x, pos: _reference(x, window, pos)) if has_pos else (lambda x: _reference(x, window))


@custom_op("fastctx::window_pool")
def _window_pool(x: torch.Tensor, pos: torch.Tensor | None, window: list[int], backend: str) -> torch.Tensor:
    backend = OP.resolve(backend, x.device, x.dtype, _facts(x, window))
    batch, height, width, chans = x.shape
    if x.numel() == 0:
        return x.new_zeros(batch, height // window[0], width // window[1], chans)
    if backend == "reference":
        return reference_forward(_reference_of(window, pos is not None), [x] + ([pos] if pos is not None else []))
    return OP.kernels(backend).window_pool_fwd(x.contiguous(), None if pos is None else pos.contiguous(), window)


@_window_pool.register_fake
def _(x, pos, window, backend):
    batch, height, width, chans = x.shape
    return x.new_empty(batch, height // window[0], width // window[1], chans)


@custom_op("fastctx::window_pool_backward")
def _window_pool_backward(grad: torch.Tensor, window: list[int], pos_grad: bool,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch, grid_h, grid_w, chans = grad.shape
    shape = (batch, grid_h * window[0], grid_w * window[1], chans)
    facts = dict(B=batch, H=shape[1], W=shape[2], C=chans, Wh=window[0], Ww=window[1])
    backend = OP.resolve(backend, grad.device, grad.dtype, facts)
    if grad.numel() == 0:
        return (grad.new_zeros(shape), grad.new_zeros(grid_h, grid_w, chans) if pos_grad else grad.new_empty(0))
    if backend == "reference":
        # The reference's vjp at any point (it is linear): zeros of the input shapes.
        tensors = [grad.new_zeros(shape)] + ([grad.new_zeros(grid_h, grid_w, chans)] if pos_grad else [])
        grads = reference_backward(_reference_of(window, pos_grad), tensors, grad)
        return grads[0], (grads[1] if pos_grad else grad.new_empty(0))
    return OP.kernels(backend).window_pool_bwd(grad.contiguous(), window, pos_grad)


@_window_pool_backward.register_fake
def _(grad, window, pos_grad, backend):
    batch, grid_h, grid_w, chans = grad.shape
    return (grad.new_empty(batch, grid_h * window[0], grid_w * window[1], chans),
            grad.new_empty(grid_h, grid_w, chans) if pos_grad else grad.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, pos, window, backend = inputs
    ctx.window, ctx.has_pos, ctx.backend = window, pos is not None, backend


def _backward(ctx, grad):
    pos_grad = ctx.has_pos and ctx.needs_input_grad[1]
    grad_x, grad_pos = _window_pool_backward(grad, ctx.window, pos_grad, ctx.backend)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_pos if pos_grad else None, None, None)


_window_pool.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, window, pos_grad, backend = inputs
    ctx.window, ctx.pos_grad, ctx.shape = window, pos_grad, grad.shape


def _double_backward(ctx, grad_grad_x, grad_grad_pos):
    # The backward is linear in grad; its adjoint is the forward: d grad = pool(gg_x) + gg_pos (reference maths).
    if not ctx.pos_grad:
        grad_grad_pos = None
    if grad_grad_x is None and grad_grad_pos is None:
        return None, None, None, None
    if grad_grad_x is None:
        d_grad = grad_grad_pos.expand(ctx.shape)
    else:
        d_grad = _reference(grad_grad_x, ctx.window, grad_grad_pos)
    return d_grad, None, None, None


_window_pool_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


def window_pool(x: torch.Tensor, window, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each window of a channels-last map, + a positional encoding: [B, Hp, Wp, C] -> [B, Hg, Wg, C].

    Args:
        x: [B, Hp, Wp, C], Hp and Wp multiples of the window (IIWA's padded map).
        window: (Wh, Ww) or an int; Hg = Hp / Wh, Wg = Wp / Ww.
        pos: [Hg, Wg, C] added to every image's tokens after the mean, cast to x's dtype (as the
            released code adds its float32 sine encoding), or None.
    Returns [B, Hg, Wg, C] in x's dtype: `AvgPool2d(window)` over the map (every token counts, padded
    ones included) + pos. Differentiable w.r.t. x and pos.
    """
    check_tensor(x, "x", 4, "of shape [B, Hp, Wp, C] (channels last)")
    wh, ww = window_size(window)
    batch, height, width, chans = x.shape
    if height % wh or width % ww or height == 0 or width == 0:
        raise ValueError(f"x's height and width ({height}, {width}) must be positive multiples of the window "
                         f"({wh}, {ww}): pad the map to whole windows first")
    grid = (height // wh, width // ww, chans)
    if pos is not None:
        check_tensor(pos, "pos", 3, f"of shape [Hg, Wg, C] = {list(grid)}")
        check_same({"x": x, "pos": pos}, same_dtype=False)  # pos is cast to x's dtype, as released
        if tuple(pos.shape) != grid:
            raise ValueError(f"pos must be [Hg, Wg, C] = {list(grid)} for x {tuple(x.shape)} and window "
                             f"({wh}, {ww}), got {tuple(pos.shape)}")
    backend = OP.wrapper_backend(x.device, x.dtype, _facts(x, (wh, ww)))
    if backend == "reference" and batch > 0:
        return _reference(x, (wh, ww), pos)
    return _window_pool(x, None if pos is None else pos.to(x.dtype), [wh, ww], backend)
