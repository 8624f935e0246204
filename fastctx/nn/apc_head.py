"""Drop-in Adaptive Context Module and APCHead (mmsegmentation 1.x names and arguments).

Parameters and buffers are named exactly as in mmseg's `apc_head.py`, so its
state_dicts load with strict=True, and the constructors take mmseg's arguments
(`conv_cfg`, `norm_cfg`, `act_cfg`, BaseDecodeHead's keywords) as well as the
short `norm=` form. With `fused=True` (default) the forward runs the fastctx ops:

  pyramid_pool   all pool scales of x from one read of x (and the global means of the reduced x)
  gla_context    sigmoid affinity x pooled context, no [B, HW, S] tensor
  residual_relu  residual_conv's BN (folded in eval) + ReLU + residual add + ReLU in one pass

When autograd records the forward (training) every scale goes through each op
at once. In inference the scales go one at a time and each scale's maps are
freed before the next, so the fused head never holds more than mmseg's
per-scale loop does; APCHead also feeds each scale straight into its share of
the bottleneck conv instead of concatenating [x, acm outputs].

With `fused=False` it runs mmseg's eager maths (fastctx.reference.apc_head).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference.apc_head import acm_forward, apc_head_forward
from ._checks import check_input_dtype, check_pool_scales, check_positive_int
from .conv_module import UNSET, ConvModule, activation_is_relu, resolve_layer_args
from .decode_head import DecodeHead

__all__ = ["ACM", "APCHead", "fused_acm_forward"]


class ACM(nn.Module):
    """Adaptive Context Module for one pool scale (mmseg `ACM`).

    Arguments in mmseg's order: `pool_scale, fusion, in_channels, channels,
    conv_cfg, norm_cfg, act_cfg`; `norm=` / `act=` are the short forms of
    norm_cfg / act_cfg (see fastctx.nn.ConvModule). Default: BatchNorm + ReLU;
    `norm_cfg=None` builds convs with bias and no norm, as mmseg does.
    """

    def __init__(self, pool_scale: int, fusion: bool, in_channels: int, channels: int, conv_cfg: dict | None = None,
                 norm_cfg=UNSET, act_cfg=UNSET, *, norm=UNSET, act=UNSET, fused: bool = True):
        super().__init__()
        who = type(self).__name__
        self.pool_scale = check_positive_int(pool_scale, "pool_scale", who)
        self.in_channels = check_positive_int(in_channels, "in_channels", who)
        self.channels = check_positive_int(channels, "channels", who)
        self.fusion = bool(fusion)
        self.fused = fused
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        self.pooled_redu_conv = ConvModule(in_channels, channels, 1, **layers)
        self.input_redu_conv = ConvModule(in_channels, channels, 1, **layers)
        self.global_info = ConvModule(channels, channels, 1, **layers)
        self.gla = nn.Conv2d(channels, self.pool_scale ** 2, 1, 1, 0)
        self.residual_conv = ConvModule(channels, channels, 1, **layers)
        if self.fusion:
            self.fusion_conv = ConvModule(channels, channels, 1, **layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_features(x, self.in_channels, self, type(self).__name__)
        if not self.fused:
            return acm_forward(self, x)
        return fused_acm_forward([self], x)


def _check_features(x, in_channels: int, module: nn.Module, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a tensor [B, {in_channels}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{who} expects input of shape [B, {in_channels}, H, W], got {tuple(x.shape)}")
    check_input_dtype(x, module, who)  # floating-point, and the parameters' dtype


def _cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat without the copy of a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim)


def _norm_as_affine(norm: nn.Module | None, pre: torch.Tensor):
    """(y, scale, shift) with norm(pre) == y * scale + shift per channel.

    No norm: the identity. BatchNorm with running statistics (eval): folded
    into the affine map, which the fused epilogue applies. Otherwise (batch
    statistics in training, SyncBatchNorm reducing across processes) the layer
    itself runs and the affine map is the identity.
    """
    acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
    channels = pre.shape[1]
    if norm is not None and (norm.training or not norm.track_running_stats):
        pre = norm(pre)
        norm = None
    if norm is None:
        return pre, pre.new_ones(channels, dtype=acc), pre.new_zeros(channels, dtype=acc)
    mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    weight = norm.weight.to(acc) if norm.affine else torch.ones_like(mean)
    bias = norm.bias.to(acc) if norm.affine else torch.zeros_like(mean)
    scale = weight * torch.rsqrt(var + norm.eps)
    return pre, scale, bias - mean * scale


def _norm_act(module: ConvModule, pre: torch.Tensor) -> torch.Tensor:
    """What a ConvModule applies after its conv."""
    out = module.bn(pre) if module.with_norm else pre
    return module.activate(out) if module.with_activation else out


def _residual_epilogue(acms: Sequence[ACM], pre: Sequence[torch.Tensor], reduced: torch.Tensor) -> torch.Tensor:
    """relu(residual_conv(context) + reduced) of the stacked groups, from each residual conv's output `pre`."""
    convs = [a.residual_conv for a in acms]
    if not all(activation_is_relu(m) for m in convs):
        # The fused epilogue computes a ReLU; another activation (or none) runs as the layers themselves.
        return F.relu(_cat([_norm_act(m, p) for m, p in zip(convs, pre)], 1) + reduced)
    ys, scales, shifts = zip(*(_norm_as_affine(m.norm, p) for m, p in zip(convs, pre)))
    return ops.residual_relu(_cat(ys, 1), reduced, _cat(scales, 0), _cat(shifts, 0))


def _pooled_regions(acms: Sequence[ACM], x: torch.Tensor) -> list[torch.Tensor]:
    """Each ACM's reduced sub-region features [B, C, s*s], all scales pooled from one read of x."""
    scales = [a.pool_scale for a in acms]
    pooled_x = ops.pyramid_pool(x, scales)
    return [a.pooled_redu_conv(p).flatten(2) for a, p in zip(acms, ops.split_scales(pooled_x, scales))]


def _acm_chunk(acms: Sequence[ACM], x: torch.Tensor, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outputs of consecutive ACMs on x, concatenated on channels, each op called once for all of them.

    Intermediates are dropped as soon as the next step has consumed them, so
    one chunk holds at most three of its [B, G*C, H, W] maps at a time.
    """
    batch, groups, channels = x.shape[0], len(acms), acms[0].channels
    # Reduced features: one conv per scale, not one conv with the stacked [G*C, Cin] weight: on CPU
    # oneDNN runs the [C, Cin] convs (forward + backward) faster than the stacked one, and the layers'
    # own BatchNorm is cheaper than batch statistics computed outside them.
    reduced = _cat([a.input_redu_conv(x) for a in acms], 1)
    # Global context enters gla(x + g) as a per-image logit bias: W g + b.
    means = ops.pyramid_pool(reduced, [1]).view(batch, groups, channels)
    bias = torch.cat(
        [F.linear(a.global_info(means[:, i, :, None, None]).flatten(1), a.gla.weight.flatten(1), a.gla.bias)
         for i, a in enumerate(acms)], dim=1,
    )
    weight = _cat([a.gla.weight.flatten(1) for a in acms], 0)  # [S, C]
    # No casts to x's dtype: outside autocast all four already share it, inside autocast the op
    # takes mixed dtypes and rounding the fp32 gla weights to 16 bits first would only lose precision.
    context = ops.gla_context(reduced, weight, bias, _cat(pooled, 2), [a.pool_scale ** 2 for a in acms])
    pre = [a.residual_conv.conv(c) for a, c in zip(acms, context.split(channels, 1))]
    del context
    # residual_conv's norm (folded in eval) + ReLU + reduced + ReLU in one pass.
    out = _residual_epilogue(acms, pre, reduced)
    del pre, reduced
    if acms[0].fusion:
        out = _cat([a.fusion_conv(o) for a, o in zip(acms, out.split(channels, 1))], 1)
    return out


def _scale_chunks(acms: Sequence[ACM], x: torch.Tensor) -> list[range]:
    """Which ACMs go through the ops together: all at once when autograd records (fewest op calls; the
    graph keeps every scale's maps anyway), else one at a time (each scale's maps are freed before the
    next scale is computed)."""
    records = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for a in acms
                                                                   for p in a.parameters()))
    return [range(len(acms))] if records else [range(i, i + 1) for i in range(len(acms))]


def _check_fusable(acms: Sequence[ACM]) -> None:
    first = acms[0]
    if any(a.channels != first.channels or a.fusion != first.fusion for a in acms):
        raise ValueError("fused ACMs must share channels and fusion")


def fused_acm_forward(acms: Sequence[ACM], x: torch.Tensor) -> torch.Tensor:
    """Outputs of several ACMs on the same x, concatenated on channels: [B, G*C, H, W]."""
    acms = list(acms)
    _check_fusable(acms)
    regions = _pooled_regions(acms, x)
    chunks = _scale_chunks(acms, x)
    if len(chunks) == 1:
        return _acm_chunk(acms, x, regions)
    out = None
    for chunk in chunks:
        part = _acm_chunk(acms[chunk.start:chunk.stop], x, regions[chunk.start:chunk.stop])
        if out is None:  # the chunks' dtype (autocast decides it)
            out = part.new_empty(x.shape[0], len(acms) * acms[0].channels, *x.shape[2:])
        out[:, chunk.start * acms[0].channels:chunk.stop * acms[0].channels].copy_(part)
        del part
    return out


class APCHead(DecodeHead):
    """APCNet decode head (mmseg `APCHead`): ACMs at several scales + 3x3 bottleneck + classifier.

    Args:
        in_channels: channels of the backbone feature used (2048 for ResNet-50/101).
        channels: channels inside the head (512).
        num_classes: output classes.
        pool_scales: ACM pool scales, a list or tuple of positive ints.
        fusion: apply each ACM's `fusion_conv`.
        dropout_ratio: Dropout2d before `conv_seg`.
        align_corners: kept for API parity with mmseg (used when resizing logits).
        norm: "BN", "SyncBN", an mmseg norm_cfg dict, a norm-layer class, or
            None (convs with bias, no norm). Default "BN".
        fused: run fastctx's fused ops (True) or mmseg's eager maths (False).
        in_index: which backbone feature to use when given a list (mmseg's default -1).
        conv_cfg, norm_cfg, act_cfg: mmseg's layer configs (norm_cfg is the
            same as `norm`; note mmseg's own default is norm_cfg=None, fastctx's
            is BatchNorm). act_cfg=None or another activation is computed, the
            fused epilogue then runs eagerly.
        input_transform, out_channels, threshold, loss_decode, ignore_index,
            sampler, init_cfg: mmseg's BaseDecodeHead arguments, accepted for
            what fastctx builds (see fastctx.nn.decode_head).
    """

    def __init__(self, in_channels: int = 2048, channels: int = 512, num_classes: int = 19,
                 pool_scales=(1, 2, 3, 6), fusion: bool = True, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm=UNSET, fused: bool = True, in_index: int = -1, *,
                 conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET, act=UNSET, input_transform=None,
                 out_channels: int | None = None, threshold=None, loss_decode=None, ignore_index: int = 255,
                 sampler=None, init_cfg=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        who = type(self).__name__
        self.in_channels = check_positive_int(in_channels, "in_channels", who)
        self.pool_scales = check_pool_scales(pool_scales, who)
        if input_transform is not None:
            raise ValueError(f"{who} uses one feature: input_transform must be None, got {input_transform!r}")
        if not isinstance(in_index, int):
            raise TypeError(f"{who} uses one backbone feature: in_index must be an int, got {in_index!r}")
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        self.fusion = fusion
        self.in_index = in_index
        self._fused = fused
        self.acm_modules = nn.ModuleList(
            [ACM(s, fusion, in_channels, channels, conv_cfg, norm, act, fused=fused) for s in self.pool_scales]
        )
        self.bottleneck = ConvModule(in_channels + len(self.pool_scales) * channels, channels, 3, padding=1,
                                     conv_cfg=conv_cfg, norm_cfg=norm, act_cfg=act)

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
        _check_features(x, self.in_channels, self, type(self).__name__)
        if not self._fused:
            return apc_head_forward(self, x)
        acms = list(self.acm_modules)
        _check_fusable(acms)
        regions = _pooled_regions(acms, x)
        # conv(cat[x, acm_1, ..., acm_G]) == conv(x, W_x) + sum_g conv(acm_g, W_g): no concat copy of x, and
        # in inference each chunk of scales is added in and freed before the next one is computed.
        conv = self.bottleneck.conv
        weight = conv.weight
        out = F.conv2d(x, weight[:, :self.in_channels], conv.bias, conv.stride, conv.padding, conv.dilation)
        offset = self.in_channels
        for chunk in _scale_chunks(acms, x):
            part = _acm_chunk(acms[chunk.start:chunk.stop], x, regions[chunk.start:chunk.stop])
            width = part.shape[1]
            out += F.conv2d(part, weight[:, offset:offset + width], None, conv.stride, conv.padding, conv.dilation)
            offset += width
            del part
        return self.cls_seg(_norm_act(self.bottleneck, out))
