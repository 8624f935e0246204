"""Drop-in Adaptive Context Module and APCHead (mmsegmentation 1.x names).

Parameters and buffers are named exactly as in mmseg's `apc_head.py`, so its
state_dicts load with strict=True. With `fused=True` (default) the forward runs
the fastctx ops:

  pyramid_pool   all pool scales of x from one read of x (and the global means of the reduced x)
  gla_context    sigmoid affinity x pooled context for all scales, no [B, HW, S] tensor
  residual_relu  residual_conv's BN (folded in eval) + ReLU + residual add + ReLU in one pass

With `fused=False` it runs mmseg's eager maths (fastctx.reference.apc_head).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference.apc_head import acm_forward, apc_head_forward
from .conv_module import ConvModule
from .decode_head import DecodeHead


class ACM(nn.Module):
    """Adaptive Context Module for one pool scale (mmseg `ACM`)."""

    def __init__(self, pool_scale: int, fusion: bool, in_channels: int, channels: int,
                 norm="BN", fused: bool = True):
        super().__init__()
        if pool_scale < 1:
            raise ValueError(f"pool_scale must be a positive int, got {pool_scale}")
        self.pool_scale = int(pool_scale)
        self.fusion = bool(fusion)
        self.in_channels = in_channels
        self.channels = channels
        self.fused = fused
        self.pooled_redu_conv = ConvModule(in_channels, channels, 1, norm=norm)
        self.input_redu_conv = ConvModule(in_channels, channels, 1, norm=norm)
        self.global_info = ConvModule(channels, channels, 1, norm=norm)
        self.gla = nn.Conv2d(channels, self.pool_scale ** 2, 1, 1, 0)
        self.residual_conv = ConvModule(channels, channels, 1, norm=norm)
        if self.fusion:
            self.fusion_conv = ConvModule(channels, channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.in_channels, type(self).__name__)
        if not self.fused:
            return acm_forward(self, x)
        return fused_acm_forward([self], x)


def _check_features(x, in_channels: int, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a tensor [B, {in_channels}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{who} expects input of shape [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got {x.dtype}")


def _epilogue_bn(norms: Sequence[nn.modules.batchnorm._BatchNorm], pre: Sequence[torch.Tensor]):
    """(y, scale, shift) with norm_g(pre_g) == y_g * scale + shift for the stacked groups.

    With running statistics (eval) the BatchNorms fold into the fused epilogue's
    per-channel affine map. In training the layers themselves run (PyTorch's
    BatchNorm kernels: batch statistics, running-stat updates, SyncBatchNorm
    across processes) and the epilogue's affine map is the identity.
    """
    if all(not n.training and n.track_running_stats for n in norms):
        y = torch.cat(list(pre), 1) if len(pre) > 1 else pre[0]
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        mean = torch.cat([n.running_mean for n in norms]).to(acc)
        var = torch.cat([n.running_var for n in norms]).to(acc)
        eps = torch.cat([mean.new_full((n.num_features,), n.eps) for n in norms])
        weight = torch.cat([n.weight if n.affine else mean.new_ones(n.num_features) for n in norms]).to(acc)
        bias = torch.cat([n.bias if n.affine else mean.new_zeros(n.num_features) for n in norms]).to(acc)
        scale = weight * torch.rsqrt(var + eps)
        return y, scale, bias - mean * scale
    y = torch.cat([n(p) for n, p in zip(norms, pre)], 1) if len(pre) > 1 else norms[0](pre[0])
    return y, y.new_ones(y.shape[1]), y.new_zeros(y.shape[1])


def fused_acm_forward(acms: Sequence[ACM], x: torch.Tensor) -> torch.Tensor:
    """Outputs of several ACMs on the same x, concatenated on channels: [B, G*C, H, W]."""
    groups = len(acms)
    batch = x.shape[0]
    channels = acms[0].channels
    scales = [a.pool_scale for a in acms]
    sizes = [s * s for s in scales]
    fusion = acms[0].fusion
    if any(a.channels != channels or a.fusion != fusion for a in acms):
        raise ValueError("fused ACMs must share channels and fusion")

    # Sub-region features of every scale from one read of x.
    pooled_x = ops.pyramid_pool(x, scales)
    pooled = torch.cat(
        [a.pooled_redu_conv(p).flatten(2) for a, p in zip(acms, ops.split_scales(pooled_x, scales))], dim=2
    )  # [B, C, S_tot]

    # Reduced features of every scale. One conv per scale, not one conv with the
    # stacked [G*C, Cin] weight: on CPU oneDNN runs the four [C, Cin] convs
    # (forward + backward) faster than the stacked one, and the layers' own
    # BatchNorm is cheaper than batch statistics computed outside them.
    reduced = torch.cat([a.input_redu_conv(x) for a in acms], 1)

    # Global context enters gla(x + g) as a per-image logit bias: W g + b.
    means = ops.pyramid_pool(reduced, [1]).view(batch, groups, channels)
    bias = torch.cat(
        [F.linear(a.global_info(means[:, i, :, None, None]).flatten(1), a.gla.weight.flatten(1), a.gla.bias)
         for i, a in enumerate(acms)], dim=1,
    )
    weight = torch.cat([a.gla.weight.flatten(1) for a in acms])  # [S_tot, C]
    # No casts to x's dtype: outside autocast all four already share it, inside autocast the op
    # takes mixed dtypes and rounding the fp32 gla weights to 16 bits first would only lose precision.
    context = ops.gla_context(reduced, weight, bias, pooled, sizes)

    # residual_conv + BN + ReLU + x + ReLU: the BN (folded in eval) and the rest in one pass.
    res_pre = [a.residual_conv.conv(c) for a, c in zip(acms, context.split(channels, 1))]
    res, scale, shift = _epilogue_bn([a.residual_conv.bn for a in acms], res_pre)
    out = ops.residual_relu(res, reduced, scale, shift)
    if fusion:
        out = torch.cat([a.fusion_conv(o) for a, o in zip(acms, out.split(channels, 1))], 1)
    return out


class APCHead(DecodeHead):
    """APCNet decode head (mmseg `APCHead`): ACMs at several scales + 3x3 bottleneck + classifier.

    Args:
        in_channels: channels of the backbone feature used (2048 for ResNet-50/101).
        channels: channels inside the head (512).
        num_classes: output classes.
        pool_scales: ACM pool scales.
        fusion: apply each ACM's `fusion_conv`.
        dropout_ratio: Dropout2d before `conv_seg`.
        align_corners: kept for API parity with mmseg (used when resizing logits).
        norm: "BN", "SyncBN" or a norm-layer class.
        fused: run fastctx's fused ops (True) or mmseg's eager maths (False).
        in_index: which backbone feature to use when given a list (mmseg's default -1).
    """

    def __init__(self, in_channels: int = 2048, channels: int = 512, num_classes: int = 19,
                 pool_scales=(1, 2, 3, 6), fusion: bool = True, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm="BN", fused: bool = True, in_index: int = -1):
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        if isinstance(pool_scales, int):
            pool_scales = (pool_scales,)
        if not pool_scales:
            raise ValueError("pool_scales must name at least one scale")
        self.in_channels = in_channels
        self.pool_scales = tuple(int(s) for s in pool_scales)
        self.fusion = fusion
        self.in_index = in_index
        self._fused = fused
        self.acm_modules = nn.ModuleList(
            [ACM(s, fusion, in_channels, channels, norm=norm, fused=fused) for s in self.pool_scales]
        )
        self.bottleneck = ConvModule(in_channels + len(self.pool_scales) * channels, channels, 3, padding=1, norm=norm)

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for acm in self.acm_modules:
            acm.fused = self._fused

    def forward(self, inputs) -> torch.Tensor:
        x = inputs[self.in_index] if isinstance(inputs, (list, tuple)) else inputs
        _check_features(x, self.in_channels, type(self).__name__)
        if not self._fused:
            return apc_head_forward(self, x)
        acm = fused_acm_forward(list(self.acm_modules), x)
        # conv(cat[x, acm]) == conv(x, W[:, :Cin]) + conv(acm, W[:, Cin:]): no concat copy.
        conv = self.bottleneck.conv
        weight = conv.weight
        out = F.conv2d(x, weight[:, :self.in_channels], None, conv.stride, conv.padding, conv.dilation)
        out = out + F.conv2d(acm, weight[:, self.in_channels:], None, conv.stride, conv.padding, conv.dilation)
        out = self.bottleneck.activate(self.bottleneck.bn(out))
        return self.cls_seg(out)
