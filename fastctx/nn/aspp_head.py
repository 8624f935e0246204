"""Drop-in ASPP head (mmsegmentation 1.x `ASPPHead`, DeepLabV3), also the base network of ACFHead.

Parameter names are mmseg's, so its state_dicts load with strict=True:
`image_pool.1.{conv,bn}.*` (global average pool -> 1x1 CBR), `aspp_modules.{i}.{conv,bn}.*`
(1x1 CBR for dilation 1, dilated 3x3 CBRs otherwise), `bottleneck.{conv,bn}.*`
(3x3 CBR over the concatenated branches), `conv_seg.*`. No fused kernels: the
head is convolutions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_input_dtype
from .conv_module import UNSET, ConvModule, resolve_layer_args
from .decode_head import DecodeHead
from .ocr_head import check_map, init_inputs, transform_inputs

__all__ = ["ASPPHead", "ASPPModule"]


class ASPPModule(nn.ModuleList):
    """Parallel atrous branches (mmseg `ASPPModule`): forward returns the list of branch outputs."""

    def __init__(self, dilations: Sequence[int], in_channels: int, channels: int, conv_cfg: dict | None = None,
                 norm_cfg=UNSET, act_cfg=UNSET, *, norm=UNSET, act=UNSET):
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, type(self).__name__)
        super().__init__(
            ConvModule(in_channels, channels, 1 if d == 1 else 3, padding=0 if d == 1 else d, dilation=d, norm=norm,
                       act=act)
            for d in dilations
        )
        self.dilations, self.in_channels, self.channels = tuple(dilations), in_channels, channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self]


class ASPPHead(DecodeHead):
    """DeepLabV3's head: image pooling + atrous branches -> 3x3 bottleneck -> Dropout2d -> conv_seg.

    Args (mmseg's names):
        dilations: one branch per dilation (mmseg's D8 configs: (1, 12, 24, 36)).
        in_channels, channels, num_classes, dropout_ratio, conv_cfg, norm_cfg, act_cfg, norm, act,
        in_index, input_transform, align_corners, out_channels, threshold, loss_decode, ignore_index,
        sampler, init_cfg: as fastctx.nn.OCRHead.
    """

    def __init__(self, dilations=(1, 6, 12, 18), *, in_channels=2048, channels: int = 512, num_classes: int = 19,
                 dropout_ratio: float = 0.1, conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET,
                 norm=UNSET, act=UNSET, in_index=-1, input_transform: str | None = None, align_corners: bool = False,
                 out_channels: int | None = None, threshold=None, loss_decode=None, ignore_index: int = 255,
                 sampler=None, init_cfg=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        who = type(self).__name__
        if not isinstance(dilations, (list, tuple)) or not dilations or \
                any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"{who} dilations must be a non-empty list of positive ints, got {dilations!r}")
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        self.in_channels = init_inputs(in_channels, in_index, input_transform, who)
        self.in_index, self.input_transform = in_index, input_transform
        self.dilations = tuple(dilations)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(self.in_channels, channels, 1, **layers))
        self.aspp_modules = ASPPModule(self.dilations, self.in_channels, channels, **layers)
        self.bottleneck = ConvModule((len(self.dilations) + 1) * channels, channels, 3, padding=1, **layers)

    def _transform_inputs(self, inputs) -> torch.Tensor:
        x = transform_inputs(self, inputs)
        check_map(x, self.in_channels, type(self).__name__, "backbone features")
        check_input_dtype(x, self, type(self).__name__)
        return x

    def _forward_feature(self, inputs) -> torch.Tensor:
        """The bottleneck's output [B, channels, H, W] (before dropout and conv_seg)."""
        x = self._transform_inputs(inputs)
        pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return self.bottleneck(torch.cat([pooled, *self.aspp_modules(x)], dim=1))

    def forward(self, inputs) -> torch.Tensor:
        return self.cls_seg(self._forward_feature(inputs))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, num_classes={self.num_classes}, "
                f"dilations={self.dilations}, in_index={self.in_index}")
