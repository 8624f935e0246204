"""Drop-in Adaptive Context Module and APCHead (mmsegmentation 1.x names).

Parameters and buffers are named exactly as in mmseg's `apc_head.py`, so its
state_dicts load with strict=True. With `fused=True` (default) the forward runs
the fastctx ops:

  pyramid_pool   all pool scales of x from one read of x
  stacked 1x1    the `input_redu_conv`s of all scales as one conv
  gla_context    sigmoid affinity x pooled context for all scales, no [B, HW, S] tensor
  residual_relu  residual_conv's BN + ReLU + residual add + ReLU in one pass
  bottleneck     conv(cat[x, acm...]) as conv(x) + conv(acm...): no concat copy of x

With `fused=False` it runs mmseg's eager maths (fastctx.reference.apc_head).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference.apc_head import acm_forward, apc_head_forward
from ._batchnorm import affine_relu, batchnorm_affine
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


def _stacked(convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    return torch.cat([c.weight for c in convs]) if len(convs) > 1 else convs[0].weight


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
    dtype = x.dtype

    # Sub-region features of every scale from one read of x.
    pooled_x = ops.pyramid_pool(x, scales)
    pooled = torch.cat(
        [a.pooled_redu_conv(p).flatten(2) for a, p in zip(acms, ops.split_scales(pooled_x, scales))], dim=2
    )  # [B, C, S_tot]

    # Reduced features of every scale: one conv with the stacked weights.
    x_pre = F.conv2d(x, _stacked([a.input_redu_conv.conv for a in acms]))
    scale, shift = batchnorm_affine([a.input_redu_conv.bn for a in acms], x_pre)
    reduced = affine_relu(x_pre, scale, shift)

    # Global context enters gla(x + g) as a per-image logit bias: W g + b.
    means = ops.pyramid_pool(reduced, [1]).view(batch, groups, channels)
    bias = torch.cat(
        [F.linear(a.global_info(means[:, i, :, None, None]).flatten(1), a.gla.weight.flatten(1), a.gla.bias)
         for i, a in enumerate(acms)], dim=1,
    )
    weight = torch.cat([a.gla.weight.flatten(1) for a in acms])  # [S_tot, C]
    context = ops.gla_context(reduced, weight.to(dtype), bias.to(dtype), pooled.to(dtype), sizes)

    # residual_conv (grouped 1x1 over the stacked scales) + BN + ReLU + x + ReLU.
    res_pre = F.conv2d(context, _stacked([a.residual_conv.conv for a in acms]), groups=groups)
    scale, shift = batchnorm_affine([a.residual_conv.bn for a in acms], res_pre)
    out = ops.residual_relu(res_pre, reduced, scale, shift)
    if fusion:
        fus_pre = F.conv2d(out, _stacked([a.fusion_conv.conv for a in acms]), groups=groups)
        scale, shift = batchnorm_affine([a.fusion_conv.bn for a in acms], fus_pre)
        out = affine_relu(fus_pre, scale, shift)
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
