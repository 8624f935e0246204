"""BatchNorm layers folded into a per-channel affine map, with nn.BatchNorm2d's semantics.

The fused ACM path runs the BatchNorms of all pool scales at once on stacked
channels and feeds BN into fused epilogues as (scale, shift). This module keeps
the layers' exact behaviour: batch statistics (biased variance) in training,
running statistics updated with the unbiased variance and each layer's momentum
(cumulative average when momentum is None), running statistics in eval, and
cross-process statistics for SyncBatchNorm under torch.distributed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _sync_stats(mean, var, count: int):
    """Combine per-process (mean, biased var, count) into global ones, differentiably."""
    all_reduce = _AllReduceSum.apply
    total = all_reduce(torch.tensor([float(count)], device=mean.device, dtype=mean.dtype))
    global_mean = all_reduce(mean * count) / total
    # sum_i n_i (var_i + (mean_i - mean)^2) / N: no E[x^2] - E[x]^2 cancellation.
    global_var = all_reduce(count * (var + (mean - global_mean) ** 2)) / total
    return global_mean, global_var, int(total.item())


def batchnorm_affine(norms: Sequence[nn.modules.batchnorm._BatchNorm], y: torch.Tensor):
    """(scale, shift) per channel of y such that norm(y) == y * scale + shift.

    `norms` are the BatchNorm layers of consecutive channel groups of y (their
    channel counts add up to y.shape[1]). In training the statistics are y's
    batch statistics (gradients flow through them) and the layers' running
    statistics are updated as nn.BatchNorm2d.forward would.
    """
    channels = [n.num_features for n in norms]
    if sum(channels) != y.shape[1]:
        raise ValueError(f"BatchNorm layers cover {sum(channels)} channels, the input has {y.shape[1]}")
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    training = norms[0].training
    use_batch_stats = training or not norms[0].track_running_stats
    if use_batch_stats:
        count = y.numel() // y.shape[1]
        if training and count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
        var, mean = torch.var_mean(y.to(acc), dim=(0, 2, 3), unbiased=False)
        if any(isinstance(n, nn.SyncBatchNorm) for n in norms) and dist.is_available() and dist.is_initialized() and training:
            mean, var, count = _sync_stats(mean, var, count)
        if training:
            _update_running_stats(norms, mean.detach(), var.detach(), count)
    else:
        mean = torch.cat([n.running_mean for n in norms]).to(acc)
        var = torch.cat([n.running_var for n in norms]).to(acc)
    eps = torch.cat([y.new_full((c,), n.eps, dtype=acc) for n, c in zip(norms, channels)])
    weight = torch.cat([n.weight if n.affine else y.new_ones(c, dtype=acc) for n, c in zip(norms, channels)]).to(acc)
    bias = torch.cat([n.bias if n.affine else y.new_zeros(c, dtype=acc) for n, c in zip(norms, channels)]).to(acc)
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


@torch.no_grad()
def _update_running_stats(norms, mean, var, count: int):
    unbiased = var * (count / (count - 1)) if count > 1 else var
    offset = 0
    for n in norms:
        if not n.track_running_stats:
            offset += n.num_features
            continue
        n.num_batches_tracked.add_(1)
        factor = n.momentum if n.momentum is not None else 1.0 / float(n.num_batches_tracked)
        sl = slice(offset, offset + n.num_features)
        n.running_mean.mul_(1 - factor).add_(mean[sl].to(n.running_mean.dtype), alpha=factor)
        n.running_var.mul_(1 - factor).add_(unbiased[sl].to(n.running_var.dtype), alpha=factor)
        offset += n.num_features


def affine_relu(y, scale, shift):
    """relu(y * scale + shift) per channel (a folded BatchNorm followed by ReLU)."""
    shape = (1, -1, 1, 1)
    return torch.relu(torch.addcmul(shift.view(shape).to(y.dtype), y, scale.view(shape).to(y.dtype)))
