"""Drop-in FCN decode head (mmsegmentation 1.x `FCNHead`), also the auxiliary head of APCNet / EncNet / FCN.

Parameter names follow mmseg so its checkpoints load with strict=True:
`convs.{i}.{conv,bn}.*`, `conv_cat.{conv,bn}.*` (when concat_input), `conv_seg.*`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_input_dtype, check_positive_int
from .conv_module import UNSET, ConvModule, resolve_layer_args
from .decode_head import DecodeHead


class FCNHead(DecodeHead):
    """Fully convolutional head: `num_convs` conv-BN-ReLU blocks, optional concat with the input, classifier.

    Args:
        in_channels: channels of the backbone feature used.
        channels: channels inside the head.
        num_classes: output classes.
        num_convs: conv-BN-ReLU blocks (0: the input itself, which then needs
            in_channels == channels).
        kernel_size: kernel of those convs (and of `conv_cat`).
        concat_input: fuse cat[input, convs(input)] with the `conv_cat` block.
        dilation: dilation of the `convs` (not of `conv_cat`, as in mmseg).
        dropout_ratio: Dropout2d before `conv_seg`.
        align_corners: used by the segmentor when resizing this head's logits.
        norm: "BN", "SyncBN", an mmseg norm_cfg dict, a norm-layer class, or
            None (convs with bias, no norm). Default "BN".
        in_index: which backbone feature to use when given a list (mmseg's default -1).
        conv_cfg, norm_cfg, act_cfg: mmseg's layer configs (norm_cfg is the
            same as `norm`; mmseg's own default is norm_cfg=None, fastctx's is
            BatchNorm).
        input_transform, out_channels, threshold, loss_decode, ignore_index,
            sampler, init_cfg: mmseg's BaseDecodeHead arguments, accepted for
            what fastctx builds (see fastctx.nn.decode_head).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 2, kernel_size: int = 3,
                 concat_input: bool = True, dilation: int = 1, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm=UNSET, in_index: int = -1, *, conv_cfg: dict | None = None,
                 norm_cfg=UNSET, act_cfg=UNSET, act=UNSET, input_transform=None, out_channels: int | None = None,
                 threshold=None, loss_decode=None, ignore_index: int = 255, sampler=None, init_cfg=None):
        who = type(self).__name__
        check_positive_int(in_channels, "in_channels", who)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"num_convs must be >= 0, got {num_convs!r}")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation must be a positive int, got {dilation!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"num_convs=0 passes the input through, so in_channels ({in_channels}) must equal "
                             f"channels ({channels})")
        if not isinstance(in_index, int):
            raise TypeError(f"FCNHead uses one backbone feature: in_index must be an int, got {in_index!r}")
        if input_transform is not None:
            raise ValueError(f"{who} uses one feature: input_transform must be None, got {input_transform!r}")
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        self.in_channels, self.in_index = in_channels, in_index
        self.num_convs, self.kernel_size, self.dilation = num_convs, kernel_size, dilation
        self.concat_input = concat_input
        padding = (kernel_size // 2) * dilation  # "same" size for odd kernels
        if num_convs == 0:
            self.convs = nn.Identity()
        else:
            self.convs = nn.Sequential(*[
                ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=padding,
                           dilation=dilation, **layers)
                for i in range(num_convs)
            ])
        if concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=kernel_size // 2,
                                       **layers)

    def _select(self, inputs) -> torch.Tensor:
        if isinstance(inputs, (list, tuple)):
            try:
                x = inputs[self.in_index]
            except IndexError:
                raise ValueError(f"FCNHead in_index {self.in_index} is out of range for {len(inputs)} "
                                 f"backbone features") from None
        else:
            x = inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FCNHead expects a feature of shape [B, {self.in_channels}, H, W] "
                             f"(in_index {self.in_index}), got {shape}")
        check_input_dtype(x, self, "FCNHead")
        return x

    def forward(self, inputs) -> torch.Tensor:
        """Logits [B, num_classes, h, w] at the feature's resolution, from a list of features or one tensor."""
        x = self._select(inputs)
        feat = self.convs(x)
        if self.concat_input:
            feat = self.conv_cat(torch.cat([x, feat], dim=1))
        return self.cls_seg(feat)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, num_classes={self.num_classes}, "
                f"num_convs={self.num_convs}, concat_input={self.concat_input}, in_index={self.in_index}")
