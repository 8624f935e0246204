"""fastctx's SyncBatchNorm: torch's layer, plus cross-process statistics on CPU.

torch's nn.SyncBatchNorm refuses CPU tensors once a process group exists, so
CPU (gloo) training could not use SyncBN at all. The subclass here keeps
torch's parameters, buffers and CUDA path, and on CPU combines the processes'
batch statistics with a differentiable all-reduce: batch statistics (biased
variance) normalise, running statistics are updated with the global unbiased
variance and the layer's momentum (cumulative average when momentum is None).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, t, group=None):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sync_stats(mean, var, count: int, group=None):
    """Combine per-process (mean, biased var, count) into global ones, differentiably."""

    def all_reduce(t):
        return _AllReduceSum.apply(t, group)

    total = all_reduce(torch.tensor([float(count)], device=mean.device, dtype=mean.dtype))
    global_mean = all_reduce(mean * count) / total
    # sum_i n_i (var_i + (mean_i - mean)^2) / N: no E[x^2] - E[x]^2 cancellation.
    global_var = all_reduce(count * (var + (mean - global_mean) ** 2)) / total
    return global_mean, global_var, int(total.item())


class SyncBatchNorm(nn.SyncBatchNorm):
    """nn.SyncBatchNorm that also synchronises CPU tensors (e.g. gloo process groups).

    Same parameters and buffers as torch's layer (state_dicts are unchanged) and
    an instance of nn.SyncBatchNorm, so checks for torch's layer still hold. On
    CUDA, in eval, or without a multi-process group it is torch's layer. On CPU
    in training under a process group, the per-channel batch statistics of all
    processes are combined with a differentiable all-reduce (input gradients
    include the other processes' contributions, as torch's CUDA kernel does), and
    the running statistics are updated with the global unbiased variance and
    the layer's momentum (cumulative average when momentum is None).
    Any input with channels on dim 1 works: [B, C], [B, C, L] (BatchNorm1d over
    EncModule's [B, K, D]), [B, C, H, W], ...
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._syncs_on_cpu(input):
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return self._cpu_sync_forward(input)

    def _syncs_on_cpu(self, input: torch.Tensor) -> bool:
        if input.device.type != "cpu" or not self.training:
            return False
        if not (dist.is_available() and dist.is_initialized()):
            return False
        group = self.process_group or dist.group.WORLD
        return dist.get_world_size(group) > 1

    def _cpu_sync_forward(self, input: torch.Tensor) -> torch.Tensor:
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.to(acc)
        count = input.numel() // channels
        if count > 0:
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
        else:  # an empty shard contributes nothing to the global statistics
            mean = var = x.new_zeros(channels)
        mean, var, total = _sync_stats(mean, var, count, group=self.process_group)
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over all "
                             f"processes (input size {tuple(input.shape)} here)")
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(acc)
        out = (x - mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(acc).view(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        unbiased = var * (count / (count - 1))  # count > 1: checked by the caller
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm layer of `module` (BatchNorm1d/2d/3d, torch's SyncBatchNorm) by fastctx's.

    The new layers share the old ones' parameters and buffers (the same tensors)
    and training flag, so the state_dict keys and values are unchanged. Returns
    the converted module (a new layer when `module` itself is a BatchNorm).
    """
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group, bias=module.bias is not None)
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    elif isinstance(module, SyncBatchNorm) and process_group is not None:
        module.process_group = process_group
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
