"""Window attention: Swin's (shifted) W-MSA and ULLMC's intra-window attention, from the token layout.

qkv [B, H, W, 3C] (the qkv Linear's output, channels last) -> out [B, H, W, C]:
per window of Wh x Ww tokens and head h, out = softmax(q k^T * scale + table[index]) v,
d = C / heads, scale = d ** -0.5 by default.

The map is padded at bottom/right to whole windows. A padded token's q/k/v is
`pad_qkv` (the qkv Linear's bias: what the Linear gives the zero tokens mmseg
pads with), and it takes part as a key, as in mmseg's Swin and the released
ULLMC code; `pad_qkv=None` excludes padded keys instead. `shift` > 0 is Swin's
cyclic shift of the padded map with -100 added to the logits of token pairs
from different regions. In the fused kernels all of this is index arithmetic:
no pad, roll, partition, mask or window_reverse tensors.

A window is small (Wh*Ww tokens, at most a few hundred), so a program owns
whole windows and the backward recomputes each window's attention from q and k
(no saved statistics):
    P = softmax(S),  O = P V,  dV = P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO O)),
    dQ = scale dS K,  dK = scale dS^T Q,  d(table)[index] = sum over windows and batch of dS,
and the padded keys' dK, dV summed into d(pad_qkv); those cross-window sums are
reduced in a fixed order.

Backends: reference (fastctx/reference/window_attention.py), cpu (csrc/cpu/window_attention.cpp, any
window size), triton (kernels/window_attention.py, d <= 64), cuda (csrc/cuda/window_attention.cu: fp32,
fp16, bf16; limited by shared memory per block, see _cuda_smem_bytes).
Contract: docs/kernels.md "window_attention".
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference.window_attention import _check_window_args
from ..reference.window_attention import window_attention as _reference
from ._dispatch import (FusedOp, Support, amp_dtype, compute_dtype, custom_op, direct_call, reference_second_order,
                        register)


def _triton_limits(facts):
    from fastctx.kernels.window_attention import limits

    return limits(facts)


# Opt-in shared memory per block (bytes) by compute capability; unknown ones get the smallest current
# figure (the extension checks the device's own value before launch either way).
_CUDA_SMEM = {75: 64 << 10, 80: 163 << 10, 86: 99 << 10, 87: 163 << 10, 89: 99 << 10, 90: 227 << 10,
              100: 227 << 10, 103: 227 << 10, 120: 99 << 10, 121: 99 << 10}
_CUDA_SMEM_DEFAULT = 99 << 10


def _cuda_smem_bytes(wh: int, ww: int, d: int) -> int:
    """Shared memory of a CUDA backward block (the larger kernel), as window_attention_plan computes it
    (csrc/cuda/window_attention_launch.h): the window's token rows and labels, K^T and V^T [d, N], a
    query block's q and dO [bq, d], its P and dS [bq, N], pad_qkv's q gradient and the table gradient,
    in fp32 for every data dtype; N and d padded to multiples of 4, bq = N up to 64 tokens, else 32."""
    n4, d4 = -(-wh * ww // 4) * 4, -(-d // 4) * 4
    bq = n4 if n4 <= 64 else 32
    entries4 = -(-(2 * wh - 1) * (2 * ww - 1) // 4) * 4
    return 12 * n4 + 4 * (2 * d4 * n4 + 2 * bq * d4 + 2 * bq * n4 + d4 + entries4)


def _cuda_limits(facts):
    if facts["N"] > 1024 or facts["d"] > 1024:
        return f"a window of {facts['N']} tokens with head_dim {facts['d']}: the CUDA kernels take N, d <= 1024"
    need = _cuda_smem_bytes(facts["Wh"], facts["Ww"], facts["d"])
    allowed = _CUDA_SMEM.get(facts["sm"], _CUDA_SMEM_DEFAULT)
    if need > allowed:
        return (f"a {facts['Wh']}x{facts['Ww']} window with head_dim {facts['d']} needs {need} bytes of shared "
                f"memory per block in the CUDA backward; sm_{facts['sm']} allows {allowed}")
    windows = facts["B"] * -(-facts["H"] // facts["Wh"]) * -(-facts["W"] // facts["Ww"])
    if windows * facts["heads"] > 2**31 - 1:
        return f"windows x heads = {windows * facts['heads']} > 2^31 - 1 (grid axis 0): split the batch"
    return None


_CUDA_NOTE = ("shared memory per block: 7x7 windows d <= 32 on sm_75; 12x12 d <= 32 on sm_86, <= 64 on sm_80, "
              "<= 128 on sm_90")
# Backends whose plain eager calls run window_attention_autograd: the raw C++/CUDA kernels under a C++ autograd
# node, without the custom op's Python layers. On one CPU core that saves 0.25 ms of a Swin-T stage 4 step
# (1.5-1.8 ms) against the dispatched custom op, 0.1 ms against the Python direct path (bench/direct_call.py).
# Every other call (torch.compile, export, modes, autocast, Triton) runs the custom op, with the same kernels.
_AUTOGRAD_KERNEL_BACKENDS = ("cpu", "cuda")
OP = register(FusedOp("window_attention", cpu=Support(), cuda=Support(limits=_cuda_limits, note=_CUDA_NOTE),
                      triton=Support(limits=_triton_limits, note="d <= 64, H*W*3C < 2^31")))


def _facts(qkv: torch.Tensor, heads: int, window) -> dict:
    batch, height, width, channels3 = qkv.shape
    return dict(B=batch, H=height, W=width, C=channels3 // 3, heads=heads, d=channels3 // 3 // heads,
                Wh=window[0], Ww=window[1], N=window[0] * window[1])


def _reference_on(present, has_table: bool, has_pad: bool, heads, window, shift, scale):
    """The reference as a function of the present tensors only (qkv, then the table and pad_qkv if given)."""
    def fn(*tensors):
        it = iter(tensors)
        qkv = next(it)
        table = next(it) if has_table else None
        pad = next(it) if has_pad else None
        return _reference(qkv, heads, window, table, shift, scale, pad)
    return fn


@custom_op("fastctx::window_attention")
def _window_attention(qkv: torch.Tensor, heads: int, window: list[int], bias_table: torch.Tensor | None,
                      shift: list[int], scale: float, pad_qkv: torch.Tensor | None, backend: str) -> torch.Tensor:
    backend = OP.resolve(backend, qkv.device, qkv.dtype, _facts(qkv, heads, window))
    batch, height, width, channels3 = qkv.shape
    if batch == 0:
        return qkv.new_empty(0, height, width, channels3 // 3)
    if backend == "reference":
        with torch.autocast(qkv.device.type if qkv.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            return _reference(qkv.contiguous(), heads, window, bias_table, shift, scale, pad_qkv).contiguous()
    return OP.kernels(backend).window_attention_fwd(
        qkv.contiguous(), None if bias_table is None else bias_table.contiguous(),
        None if pad_qkv is None else pad_qkv.contiguous(), heads, window, shift, scale)


@_window_attention.register_fake
def _(qkv, heads, window, bias_table, shift, scale, pad_qkv, backend):
    batch, height, width, channels3 = qkv.shape
    return qkv.new_empty(batch, height, width, channels3 // 3)


@custom_op("fastctx::window_attention_backward")
def _window_attention_backward(
    grad: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None,
    heads: int, window: list[int], shift: list[int], scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, qkv.device, qkv.dtype, _facts(qkv, heads, window))
    absent = lambda: qkv.new_empty(0)  # noqa: E731  (one per output: outputs may not alias)
    if qkv.shape[0] == 0:
        return (torch.zeros_like(qkv, memory_format=torch.contiguous_format),
                absent() if bias_table is None else torch.zeros_like(bias_table),
                absent() if pad_qkv is None else torch.zeros_like(pad_qkv))
    if backend == "reference":
        present = [t.contiguous() for t in (qkv, bias_table, pad_qkv) if t is not None]
        fn = _reference_on(present, bias_table is not None, pad_qkv is not None, heads, window, shift, scale)
        with torch.autocast(qkv.device.type if qkv.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            _, pullback = torch.func.vjp(fn, *present)
            grads = iter(g.contiguous() for g in pullback(grad.contiguous()))
        return next(grads), next(grads) if bias_table is not None else absent(), \
            next(grads) if pad_qkv is not None else absent()
    return OP.kernels(backend).window_attention_bwd(
        grad.contiguous(), qkv.contiguous(), None if bias_table is None else bias_table.contiguous(),
        None if pad_qkv is None else pad_qkv.contiguous(), heads, window, shift, scale)


@_window_attention_backward.register_fake
def _(grad, qkv, bias_table, pad_qkv, heads, window, shift, scale, backend):
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            qkv.new_empty(0) if bias_table is None else torch.empty_like(bias_table),
            qkv.new_empty(0) if pad_qkv is None else torch.empty_like(pad_qkv))


def _setup_context(ctx, inputs, output):
    qkv, heads, window, bias_table, shift, scale, pad_qkv, backend = inputs
    ctx.save_for_backward(qkv, bias_table, pad_qkv)
    ctx.args = (heads, window, shift, scale)
    ctx.backend = backend


def _backward(ctx, grad):
    qkv, bias_table, pad_qkv = ctx.saved_tensors
    d_qkv, d_table, d_pad = _window_attention_backward(grad, qkv, bias_table, pad_qkv, *ctx.args, ctx.backend)
    return (d_qkv, None, None, d_table if bias_table is not None else None, None, None,
            d_pad if pad_qkv is not None else None, None)


_window_attention.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, qkv, bias_table, pad_qkv, heads, window, shift, scale, backend = inputs
    ctx.save_for_backward(grad, qkv, bias_table, pad_qkv)
    ctx.args = (heads, window, shift, scale)


def _double_backward(ctx, *grad_grads):
    grad, qkv, bias_table, pad_qkv = ctx.saved_tensors
    inputs = (qkv, bias_table, pad_qkv)
    present = [t for t in inputs if t is not None]
    gg = [g for g, t in zip(grad_grads, inputs) if t is not None]
    fn = _reference_on(present, bias_table is not None, pad_qkv is not None, *ctx.args)
    d_grad, *d_present = reference_second_order(fn, grad, present, gg)
    it = iter(d_present)
    d_qkv, d_table, d_pad = (next(it) if t is not None else None for t in inputs)
    return d_grad, d_qkv, d_table, d_pad, None, None, None, None, None


_window_attention_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# FLOPs of the fused kernels' products for torch.utils.flop_counter.FlopCounterMode (2 per
# multiply-add; softmax and exp count 0, as in torch's own formulas), over the map padded to
# whole windows: q k^T and P v forward; the backward recomputes q k^T, then dV, dP, dQ and dK:
# one product more than the eager backward.
def _window_attention_product(qkv_shape, heads, window) -> int:
    """FLOPs of one [L x L] by [L x d] product in every window and head (L = Wh Ww)."""
    b, h, w, c3 = qkv_shape
    wh, ww = window
    windows = b * -(-h // wh) * -(-w // ww)
    return 2 * windows * (wh * ww) ** 2 * (c3 // 3)  # heads * d = C


@register_flop_formula(torch.ops.fastctx.window_attention)
def _window_attention_flops(qkv, heads, window, *args, **kwargs) -> int:
    return 2 * _window_attention_product(qkv, heads, window)


@register_flop_formula(torch.ops.fastctx.window_attention_backward)
def _window_attention_backward_flops(grad, qkv, bias_table, pad_qkv, heads, window, *args, **kwargs) -> int:
    return 5 * _window_attention_product(qkv, heads, window)


def window_attention(qkv: torch.Tensor, heads: int, window, bias_table: torch.Tensor | None = None,
                     shift=(0, 0), scale: float | None = None, pad_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention inside (shifted) windows of a token map: qkv [B, H, W, 3C] -> [B, H, W, C].

    Args:
        qkv: the qkv Linear's output on the (unpadded) tokens, channels last; channel
            part*C + head*d + j holds q/k/v (part 0/1/2) of head `head`, as mmseg's reshape.
        heads: number of heads (C must be divisible by it).
        window: (Wh, Ww) or an int.
        bias_table: [(2Wh-1)(2Ww-1), heads] relative position bias table, or None.
        shift: (sh, sw) cyclic shift of Swin's shifted windows (0 <= s < window), or an int.
        scale: logit scale, default d ** -0.5.
        pad_qkv: [3C] q/k/v of the tokens padding the map to whole windows (the qkv Linear's bias);
            they take part as keys. None: padded tokens are excluded as keys.
    Returns [B, H, W, C], before the output projection. Inside autocast the inputs may have mixed
    float dtypes; the result has the autocast dtype.
    """
    window, shift = _check_window_args(qkv, heads, window, bias_table, shift, pad_qkv)
    heads = int(heads)
    amp = amp_dtype(qkv)
    head_dim = qkv.shape[3] // 3 // heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    compute = qkv.dtype if amp is None else compute_dtype(qkv.device, amp)
    backend, runs_on = OP.wrapper_choice(qkv.device, compute, _facts(qkv, heads, window))
    if backend == "reference" and qkv.shape[0] > 0:
        return _reference(qkv, heads, window, bias_table, shift, scale, pad_qkv)
    if runs_on in _AUTOGRAD_KERNEL_BACKENDS and amp is None and qkv.shape[0] > 0 \
            and (bias_table is None or bias_table.dtype == compute) and (pad_qkv is None or pad_qkv.dtype == compute) \
            and direct_call((qkv, bias_table, pad_qkv)):
        # The custom op's kernels and arguments under a C++ autograd node (csrc/autograd/window_attention.cpp).
        return torch.ops.fastctx.window_attention_autograd(qkv, bias_table, pad_qkv, heads, list(window),
                                                           list(shift), scale)
    cast = lambda t: None if t is None else t.to(compute)  # noqa: E731
    out = _window_attention(qkv.to(compute), heads, list(window), cast(bias_table), list(shift), scale,
                            cast(pad_qkv), backend)
    return out if amp is None else out.to(amp)
