"""Class attention: every pixel mixes K per-class vectors with a softmax over the classes.

    query mode  (OCRNet's ObjectAttentionBlock): a_nk = softmax_k(scale * q_n . k_k)
    logits mode (ACFNet, attention = class probabilities): a_nk = softmax_k(scale * logits_kn)
    out_n = sum_k a_nk v_k

NCHW in and out. The fused backends keep the [N, K] attention per pixel tile
only and save the per-pixel log-sum-exp lse_n = log sum_k exp(scale * s_nk)
(s: the scores q_n . k_k, or the logits; float32, float64 for float64 data),
so the backward recomputes
a_nk = exp(scale * s_nk - lse_n) flash-attention style. For grad G [B, Cv, H, W]:
    dv_k = sum_n a_nk G_n;   dA_nk = G_n . v_k;   dS_nk = scale a_nk (dA_nk - G_n . out_n)
    query mode: dq_n = sum_k dS_nk k_k;  dk_k = sum_n dS_nk q_n;   logits mode: dlogits = dS

Backends: reference (fastctx/reference/class_attention.py); fused kernels register here as they land.
Contract: docs/kernels.md "class_attention".
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference.class_attention import class_attention as _reference
from ._class_tiles import cuda_support, triton_support
from ._checks import check_same, check_tensor
from ._dispatch import (FusedOp, Support, acc_dtype, amp_dtype, compute_dtype, custom_op, reference_forward,
                        reference_second_order, register)

OP = register(FusedOp("class_attention", cpu=Support(), cuda=cuda_support(), triton=triton_support("class_attention")))


def _facts(values: torch.Tensor, pixels_from: torch.Tensor, query: torch.Tensor | None) -> dict:
    return dict(B=values.shape[0], K=values.shape[1], Cv=values.shape[2], N=pixels_from.shape[2] * pixels_from.shape[3],
                Cq=0 if query is None else query.shape[1])


def _lse(query, keys, logits, scale: float) -> torch.Tensor:
    """[B, N] per-pixel log-sum-exp of the scaled scores, from the eager maths."""
    if query is not None:
        scores = torch.einsum("bcn,bkc->bnk", query.flatten(2), keys)
    else:
        scores = logits.flatten(2).transpose(1, 2)
    return torch.logsumexp(scale * scores.to(acc_dtype(scores.dtype)), dim=2)


def _empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The backward's output for an absent (None) input: an empty tensor (custom ops return tensors)."""
    return like.new_empty(0) if t is None else torch.zeros_like(t, memory_format=torch.contiguous_format)


@custom_op("fastctx::class_attention")
def _class_attention(query: torch.Tensor | None, keys: torch.Tensor | None, values: torch.Tensor,
                     logits: torch.Tensor | None, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    source = query if query is not None else logits
    backend = OP.resolve(backend, values.device, values.dtype, _facts(values, source, query))
    batch, _, cv = values.shape
    height, width = source.shape[2:]
    if batch == 0 or cv == 0:
        return values.new_zeros(batch, cv, height, width), _lse(query, keys, logits, scale).contiguous()
    if backend == "reference":
        tensors = [t for t in (query, keys, values, logits) if t is not None]
        out = reference_forward(lambda *ts: _reference(*_unpack(ts, query, keys, logits), scale), tensors)
        return out, _lse(query, keys, logits, scale).contiguous()
    return OP.kernels(backend).class_attention_fwd(
        *(None if t is None else t.contiguous() for t in (query, keys, values, logits)), scale)


def _unpack(tensors, query, keys, logits):
    """(query, keys, values, logits) from the present tensors, in that order."""
    it = iter(tensors)
    return [None if t is None else next(it) for t in (query, keys)] + [next(it)] + \
        [None if logits is None else next(it)]


@_class_attention.register_fake
def _(query, keys, values, logits, scale, backend):
    source = query if query is not None else logits
    height, width = source.shape[2:]
    batch, _, cv = values.shape
    return (values.new_empty(batch, cv, height, width),
            values.new_empty(batch, height * width, dtype=acc_dtype(values.dtype)))


@custom_op("fastctx::class_attention_backward")
def _class_attention_backward(
    grad: torch.Tensor, query: torch.Tensor | None, keys: torch.Tensor | None, values: torch.Tensor,
    logits: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    source = query if query is not None else logits
    backend = OP.resolve(backend, values.device, values.dtype, _facts(values, source, query))
    if values.shape[0] == 0 or values.shape[2] == 0:
        return _empty(query, values), _empty(keys, values), torch.zeros_like(values), _empty(logits, values)
    if backend == "reference":
        present = [t for t in (query, keys, values, logits) if t is not None]
        fn = lambda *ts: _reference(*_unpack(ts, query, keys, logits), scale)  # noqa: E731
        with torch.autocast(values.device.type if values.device.type in ("cpu", "cuda") else "cpu", enabled=False):
            _, pullback = torch.func.vjp(fn, *(t.contiguous() for t in present))
            grads = iter(g.contiguous() for g in pullback(grad.contiguous()))
        return tuple(next(grads) if t is not None else values.new_empty(0) for t in (query, keys, values, logits))
    return OP.kernels(backend).class_attention_bwd(
        grad.contiguous(), *(None if t is None else t.contiguous() for t in (query, keys, values, logits)),
        out.contiguous(), lse.contiguous(), scale)


@_class_attention_backward.register_fake
def _(grad, query, keys, values, logits, out, lse, scale, backend):
    def like(t):
        return values.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(query), like(keys), torch.empty_like(values, memory_format=torch.contiguous_format), like(logits)


def _setup_context(ctx, inputs, output):
    query, keys, values, logits, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, keys, values, logits, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad, _grad_lse):
    if grad is None:
        return None, None, None, None, None, None
    query, keys, values, logits, out, lse = ctx.saved_tensors
    grads = _class_attention_backward(grad, query, keys, values, logits, out, lse, ctx.scale, ctx.backend)
    present = (query, keys, values, logits)
    return (*(g if t is not None else None for g, t in zip(grads, present)), None, None)


_class_attention.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, query, keys, values, logits, out, lse, scale, backend = inputs
    ctx.save_for_backward(grad, query, keys, values, logits)
    ctx.scale = scale


def _double_backward(ctx, *grad_grads):
    grad, query, keys, values, logits = ctx.saved_tensors
    inputs = (query, keys, values, logits)
    present = [t for t in inputs if t is not None]
    gg = [g for g, t in zip(grad_grads, inputs) if t is not None]
    d_grad, *d_present = reference_second_order(
        lambda *ts: _reference(*_unpack(ts, query, keys, logits), ctx.scale), grad, present, gg)
    it = iter(d_present)
    return (d_grad, *(next(it) if t is not None else None for t in inputs), None, None, None, None)


_class_attention_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# FLOPs of the fused kernels' products for torch.utils.flop_counter.FlopCounterMode (2 per
# multiply-add; softmax and exp count 0, as in torch's own formulas). The backward recomputes
# the scores: one product more than the eager backward in the query form.
def _class_attention_products(values_shape, source_shape) -> int:
    """2 B N K: the FLOPs of one [K x N] product per unit of its inner size."""
    b, k, _ = values_shape
    return 2 * b * k * source_shape[2] * source_shape[3]


@register_flop_formula(torch.ops.fastctx.class_attention)
def _class_attention_flops(query, keys, values, logits, *args, **kwargs) -> int:
    unit = _class_attention_products(values, query if query is not None else logits)
    return unit * ((query[1] if query is not None else 0) + values[2])  # scores (query form), out


@register_flop_formula(torch.ops.fastctx.class_attention_backward)
def _class_attention_backward_flops(grad, query, keys, values, logits, *args, **kwargs) -> int:
    unit = _class_attention_products(values, query if query is not None else logits)
    cq = query[1] if query is not None else 0
    return unit * (3 * cq + 2 * values[2])  # scores again, dq, dk (query form); dA, dv


def class_attention(query: torch.Tensor | None, keys: torch.Tensor | None, values: torch.Tensor,
                    logits: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """out [B, Cv, H, W]: per pixel, a softmax over the K classes mixes values [B, K, Cv].

    Give either query [B, Cq, H, W] with keys [B, K, Cq] (scores q_n . k_k, OCR's object attention with
    scale = Cq ** -0.5), or logits [B, K, H, W] (ACFNet: attention = the class probabilities; keys may be
    None). Inside autocast the inputs may have mixed float dtypes; out has the autocast dtype.
    """
    if (query is None) == (logits is None):
        raise ValueError("class_attention takes exactly one of query [B, Cq, H, W] and logits [B, K, H, W]")
    check_tensor(values, "values", 3, "of shape [B, K, Cv]")
    batch, num_classes = values.shape[:2]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r} ({type(scale).__name__})")
    scale = float(scale)
    tensors = {"values": values}
    if query is not None:
        check_tensor(query, "query", 4, "of shape [B, Cq, H, W]")
        if keys is None:
            raise ValueError("keys [B, K, Cq] are required with a query")
        check_tensor(keys, "keys", 3, "of shape [B, K, Cq]")
        if keys.shape != (batch, num_classes, query.shape[1]) or query.shape[0] != batch:
            raise ValueError(f"keys must have shape [B, K, Cq] = {(batch, num_classes, query.shape[1])} for query "
                             f"{tuple(query.shape)} and values {tuple(values.shape)}, got {tuple(keys.shape)}")
        tensors.update(query=query, keys=keys)
        source = query
    else:
        check_tensor(logits, "logits", 4, "of shape [B, K, H, W]")
        if logits.shape[:2] != (batch, num_classes):
            raise ValueError(f"logits must have shape [B, K, H, W] with (B, K) = {(batch, num_classes)} of values "
                             f"{tuple(values.shape)}, got {tuple(logits.shape)}")
        keys = None  # unused by the logits form
        tensors.update(logits=logits)
        source = logits
    if num_classes == 0:
        raise ValueError(f"values must have at least one class, got shape {tuple(values.shape)}")
    if source.shape[2] == 0 or source.shape[3] == 0:
        raise ValueError(f"the map must have a non-empty spatial size, got shape {tuple(source.shape)}")
    amp = amp_dtype(values)
    check_same(tensors, same_dtype=amp is None)
    compute = values.dtype if amp is None else compute_dtype(values.device, amp)
    backend = OP.wrapper_backend(values.device, compute, _facts(values, source, query))
    if backend == "reference":
        return _reference(query, keys, values, logits, scale)
    cast = lambda t: None if t is None else t.to(compute)  # noqa: E731
    out, _ = _class_attention(cast(query), cast(keys), values.to(compute), cast(logits), scale, backend)
    return out if amp is None else out.to(amp)
