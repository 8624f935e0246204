"""Drop-in UPerNet head (mmsegmentation 1.x `UPerHead`, with PSPNet's `PPM`).

Parameter names are mmseg's, so its state_dicts load with strict=True:
`psp_modules.{i}.1.{conv,bn}.*` (adaptive average pool to scale i -> 1x1 CBR),
`bottleneck.{conv,bn}.*` (3x3 CBR over the last level and its pooled branches),
`lateral_convs.{i}.{conv,bn}.*` (1x1 CBRs of the other levels),
`fpn_convs.{i}.{conv,bn}.*` (3x3 CBRs after the top-down path),
`fpn_bottleneck.{conv,bn}.*` (3x3 CBR over all levels at the finest size),
`conv_seg.*`. No fused kernels: the head is convolutions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_input_dtype, check_pool_scales, check_positive_int
from .conv_module import UNSET, ConvModule, resolve_layer_args
from .decode_head import DecodeHead
from .ocr_head import check_map

__all__ = ["PPM", "UPerHead"]


class PPM(nn.ModuleList):
    """Pooling Pyramid Module (mmseg `PPM`): one (AdaptiveAvgPool2d(scale), 1x1 CBR) per scale; forward returns
    the branch outputs resized (bilinear) to the input's size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, conv_cfg: dict | None = None,
                 norm_cfg=UNSET, act_cfg=UNSET, align_corners: bool = False, *, norm=UNSET, act=UNSET):
        who = type(self).__name__
        pool_scales = check_pool_scales(pool_scales, who)
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1, norm=norm, act=act))
            for scale in pool_scales
        )
        self.pool_scales, self.in_channels, self.channels = pool_scales, in_channels, channels
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.interpolate(branch(x), size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
                for branch in self]


def _init_multiple_select(in_channels, in_index, input_transform, who: str) -> tuple[tuple[int, ...], tuple]:
    """mmseg's BaseDecodeHead._init_inputs for input_transform='multiple_select' (the one UPerHead uses)."""
    if input_transform != "multiple_select":
        raise ValueError(f"{who} input_transform must be 'multiple_select' (it takes one feature per level), got "
                         f"{input_transform!r}")
    if not isinstance(in_channels, Sequence) or isinstance(in_channels, str) or \
            not isinstance(in_index, Sequence) or isinstance(in_index, str) or \
            not in_channels or len(in_channels) != len(in_index):
        raise ValueError(f"{who} needs non-empty lists in_channels and in_index of one length (one entry per "
                         f"level), got {in_channels!r} and {in_index!r}")
    channels = tuple(check_positive_int(c, "in_channels", who) for c in in_channels)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in in_index):
        raise TypeError(f"{who}: in_index must be a list of ints, got {in_index!r}")
    return channels, tuple(in_index)


class UPerHead(DecodeHead):
    """UPerNet's head: PPM on the last level + FPN over all levels -> 3x3 fpn_bottleneck -> Dropout2d -> conv_seg.

    Forward (mmseg's): laterals of every level but the last (1x1) and the PPM
    bottleneck of the last; top-down, each lateral adds its coarser neighbour
    resized (bilinear) to its size; 3x3 fpn_convs on all but the last; every
    level resized to the finest and concatenated; fpn_bottleneck; classifier.

    Args (mmseg's names):
        pool_scales: the PPM's adaptive pooling sizes on the last level.
        in_channels: channels of each level (list, one per in_index).
        in_index: which backbone features are the levels, finest first.
        input_transform: must be 'multiple_select' (mmseg's UPerHead sets it).
        channels, num_classes, dropout_ratio, conv_cfg, norm_cfg, act_cfg, norm, act, align_corners,
        out_channels, threshold, loss_decode, ignore_index, sampler, init_cfg: as fastctx.nn.OCRHead.
    """

    def __init__(self, pool_scales=(1, 2, 3, 6), *, in_channels=(96, 192, 384, 768), channels: int = 512,
                 num_classes: int = 19, dropout_ratio: float = 0.1, conv_cfg: dict | None = None, norm_cfg=UNSET,
                 act_cfg=UNSET, norm=UNSET, act=UNSET, in_index=(0, 1, 2, 3),
                 input_transform: str = "multiple_select", align_corners: bool = False,
                 out_channels: int | None = None, threshold=None, loss_decode=None, ignore_index: int = 255,
                 sampler=None, init_cfg=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        who = type(self).__name__
        pool_scales = check_pool_scales(pool_scales, who)
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        self.in_channels, self.in_index = _init_multiple_select(in_channels, in_index, input_transform, who)
        self.input_transform = input_transform
        self.pool_scales = pool_scales
        last = self.in_channels[-1]
        self.psp_modules = PPM(pool_scales, last, channels, align_corners=align_corners, **layers)
        self.bottleneck = ConvModule(last + len(pool_scales) * channels, channels, 3, padding=1, **layers)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, **layers) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1, **layers)
                                       for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, padding=1, **layers)

    def _transform_inputs(self, inputs) -> list[torch.Tensor]:
        who = type(self).__name__
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"{who} expects the list of backbone features (one per level), got "
                            f"{type(inputs).__name__}")
        try:
            feats = [inputs[i] for i in self.in_index]
        except IndexError:
            raise ValueError(f"{who} in_index {self.in_index} is out of range for {len(inputs)} backbone features") \
                from None
        for level, (f, c) in enumerate(zip(feats, self.in_channels)):
            check_map(f, c, who, f"backbone features (level {level}, in_index {self.in_index[level]})")
            check_input_dtype(f, self, who)
        if len({f.shape[0] for f in feats}) > 1 or len({f.device for f in feats}) > 1:
            raise ValueError(f"{who}: the levels must share batch size and device, got shapes "
                             f"{[tuple(f.shape) for f in feats]} on {[str(f.device) for f in feats]}")
        return feats

    def psp_forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = inputs[-1]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def _forward_feature(self, inputs) -> torch.Tensor:
        """The fpn_bottleneck's output [B, channels, H0, W0] at the finest level's size (before dropout and
        conv_seg)."""
        inputs = self._transform_inputs(inputs)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        levels = len(laterals)
        for i in range(levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=self.align_corners)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
        outs.append(laterals[-1])
        for i in range(levels - 1, 0, -1):
            outs[i] = F.interpolate(outs[i], size=outs[0].shape[2:], mode="bilinear",
                                    align_corners=self.align_corners)
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs) -> torch.Tensor:
        return self.cls_seg(self._forward_feature(inputs))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, num_classes={self.num_classes}, "
                f"pool_scales={self.pool_scales}, in_index={self.in_index}")
