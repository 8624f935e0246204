"""Class gather: one feature vector per class, pooled over the pixels with class-probability weights.

    "ocr"    OCRNet's SpatialGatherModule: w_k = softmax over pixels of scale * probs_k;
             centre_k = sum_n w_kn F_n.
    "paper"  ACFNet's class centre: p_n = softmax over classes of scale * probs_n;
             centre_k = sum_n p_kn F_n / sum_n p_kn.

The fused backends read feats and probs once, never build a [B, N, K] weight map
or a [B, N, C] permuted copy, and reduce across pixel tiles deterministically.
The forward also returns one statistic per (image, class), in float32 (float64
for float64 data), that makes the backward a single local pass:
    "ocr":   lse_k = log sum_n exp(scale * probs_kn)   (w_kn = exp(scale * probs_kn - lse_k))
    "paper": mass_k = sum_n p_kn
With them (centre_k saved too), for grad G [B, K, C]:
    "ocr":   dF_n = sum_k w_kn G_k;  dprobs_kn = scale w_kn G_k . (F_n - centre_k)
    "paper": dF_n = sum_k p_kn G_k / mass_k;  dp_kn = G_k . (F_n - centre_k) / mass_k;
             dprobs_n = scale p_n * (dp_n - sum_k p_kn dp_kn)

Backends: reference (fastctx/reference/class_gather.py); fused kernels register here as they land.
Contract: docs/kernels.md "class_gather".
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..reference.class_gather import MODES
from ..reference.class_gather import class_gather as _reference
from ._class_tiles import cuda_support, triton_support
from ._checks import check_same, check_tensor
from ._dispatch import (FusedOp, Support, acc_dtype, amp_dtype, compute_dtype, custom_op, reference_backward,
                        reference_forward, reference_second_order, register)

OP = register(FusedOp("class_gather", cpu=Support(), cuda=cuda_support(), triton=triton_support("class_gather")))


def _facts(feats: torch.Tensor, probs: torch.Tensor) -> dict:
    return dict(B=feats.shape[0], C=feats.shape[1], K=probs.shape[1], N=feats.shape[2] * feats.shape[3])


def _statistic(feats: torch.Tensor, probs: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """The forward's saved [B, K] statistic, from the eager maths (the reference backend's output)."""
    logits = scale * probs.flatten(2).to(acc_dtype(probs.dtype))
    if mode == "ocr":
        return torch.logsumexp(logits, dim=2)
    return torch.softmax(logits, dim=1).sum(dim=2)


@custom_op("fastctx::class_gather")
def _class_gather(feats: torch.Tensor, probs: torch.Tensor, mode: str, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, feats.device, feats.dtype, _facts(feats, probs))
    batch, num_classes = probs.shape[:2]
    if batch == 0 or feats.shape[1] == 0:  # nothing to gather (the wrapper refuses an empty map)
        return feats.new_zeros(batch, num_classes, feats.shape[1]), _statistic(feats, probs, mode, scale).contiguous()
    if backend == "reference":
        centres = reference_forward(_reference, [feats, probs], mode, scale)
        return centres, _statistic(feats, probs, mode, scale).contiguous()
    return OP.kernels(backend).class_gather_fwd(feats.contiguous(), probs.contiguous(), mode, scale)


@_class_gather.register_fake
def _(feats, probs, mode, scale, backend):
    batch, num_classes = probs.shape[:2]
    return (feats.new_empty(batch, num_classes, feats.shape[1]),
            probs.new_empty(batch, num_classes, dtype=acc_dtype(probs.dtype)))


@custom_op("fastctx::class_gather_backward")
def _class_gather_backward(grad: torch.Tensor, feats: torch.Tensor, probs: torch.Tensor, centres: torch.Tensor,
                           stat: torch.Tensor, mode: str, scale: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    backend = OP.resolve(backend, feats.device, feats.dtype, _facts(feats, probs))
    if feats.shape[0] == 0 or feats.shape[1] == 0:
        return (torch.zeros_like(feats, memory_format=torch.contiguous_format),
                torch.zeros_like(probs, memory_format=torch.contiguous_format))
    if backend == "reference":
        return reference_backward(_reference, [feats, probs], grad, mode, scale)
    return OP.kernels(backend).class_gather_bwd(grad.contiguous(), feats.contiguous(), probs.contiguous(),
                                                centres.contiguous(), stat.contiguous(), mode, scale)


@_class_gather_backward.register_fake
def _(grad, feats, probs, centres, stat, mode, scale, backend):
    return (torch.empty_like(feats, memory_format=torch.contiguous_format),
            torch.empty_like(probs, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    feats, probs, mode, scale, backend = inputs
    centres, stat = output
    ctx.mark_non_differentiable(stat)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(feats, probs, centres, stat)
    ctx.mode, ctx.scale, ctx.backend = mode, scale, backend


def _backward(ctx, grad, _grad_stat):
    if grad is None:
        return None, None, None, None, None
    feats, probs, centres, stat = ctx.saved_tensors
    grads = _class_gather_backward(grad, feats, probs, centres, stat, ctx.mode, ctx.scale, ctx.backend)
    return (*grads, None, None, None)


_class_gather.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, feats, probs, centres, stat, mode, scale, backend = inputs
    ctx.save_for_backward(grad, feats, probs)
    ctx.mode, ctx.scale = mode, scale


def _double_backward(ctx, *grad_grads):
    grad, feats, probs = ctx.saved_tensors
    d_grad, d_feats, d_probs = reference_second_order(_reference, grad, [feats, probs], grad_grads,
                                                      ctx.mode, ctx.scale)
    return d_grad, d_feats, d_probs, None, None, None, None, None


_class_gather_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# FLOPs of the fused kernels' products for torch.utils.flop_counter.FlopCounterMode (2 per
# multiply-add; softmax and exp count 0, as in torch's own formulas): one [K x C] product over
# the pixels forward, two backward (grad_feats, and G F for grad_probs), as the eager form.
def _class_gather_product(feats_shape, probs_shape) -> int:
    b, c, h, w = feats_shape
    return 2 * b * probs_shape[1] * c * h * w


@register_flop_formula(torch.ops.fastctx.class_gather)
def _class_gather_flops(feats, probs, *args, **kwargs) -> int:
    return _class_gather_product(feats, probs)


@register_flop_formula(torch.ops.fastctx.class_gather_backward)
def _class_gather_backward_flops(grad, feats, probs, *args, **kwargs) -> int:
    return 2 * _class_gather_product(feats, probs)


def class_gather(feats: torch.Tensor, probs: torch.Tensor, mode: str = "ocr", scale: float = 1.0) -> torch.Tensor:
    """Class centres [B, K, C] of feats [B, C, H, W] weighted by probs [B, K, H, W] (coarse logits).

    mode "ocr": per class, softmax over the pixels of scale * probs (mmseg's SpatialGatherModule);
    mode "paper": per pixel, softmax over the classes of scale * probs, then the probability-weighted
    mean of the features per class (ACFNet's class centres).
    Inside autocast the inputs may have mixed float dtypes; the centres have the autocast dtype.
    """
    check_tensor(feats, "feats", 4, "of shape [B, C, H, W]")
    check_tensor(probs, "probs", 4, "of shape [B, K, H, W]")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r} ({type(scale).__name__})")
    amp = amp_dtype(feats)
    check_same({"feats": feats, "probs": probs}, same_dtype=amp is None)
    if feats.shape[0] != probs.shape[0] or feats.shape[2:] != probs.shape[2:]:
        raise ValueError(f"feats {tuple(feats.shape)} and probs {tuple(probs.shape)} must share the batch and the "
                         "spatial size ([B, C, H, W] and [B, K, H, W])")
    if probs.shape[1] == 0:
        raise ValueError(f"probs must have at least one class, got shape {tuple(probs.shape)}")
    if feats.shape[2] == 0 or feats.shape[3] == 0:
        raise ValueError(f"feats must have a non-empty spatial size, got shape {tuple(feats.shape)}")
    scale = float(scale)
    compute = feats.dtype if amp is None else compute_dtype(feats.device, amp)
    backend = OP.wrapper_backend(feats.device, compute, _facts(feats, probs))
    if backend == "reference" and feats.shape[0] > 0:  # (mmseg's view(B, K, -1) cannot take an empty batch)
        return _reference(feats, probs, mode, scale)
    centres, _ = _class_gather(feats.to(compute), probs.to(compute), mode, scale, backend)
    return centres if amp is None else centres.to(amp)
