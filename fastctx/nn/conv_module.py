"""mmcv's ConvModule (conv -> norm -> ReLU) with its parameter names `.conv` / `.bn`."""
from __future__ import annotations

import torch.nn as nn

from ._batchnorm import SyncBatchNorm


def make_norm(norm: str | type, channels: int) -> nn.Module:
    """`norm`: "BN", "SyncBN" (mmseg's norm_cfg types) or a norm-layer class.

    "SyncBN" gives fastctx's SyncBatchNorm: torch's nn.SyncBatchNorm (which it
    subclasses) that also synchronises CPU tensors under a gloo process group.
    """
    if isinstance(norm, str):
        layers = {"bn": nn.BatchNorm2d, "batchnorm": nn.BatchNorm2d, "syncbn": SyncBatchNorm}
        try:
            norm = layers[norm.lower()]
        except KeyError:
            raise ValueError(f"norm must be 'BN', 'SyncBN' or a norm-layer class, got {norm!r}") from None
    return norm(channels)


class ConvModule(nn.Module):
    """Conv2d (no bias; a norm follows) + BatchNorm/SyncBatchNorm + optional ReLU.

    Initialised as mmcv does: kaiming-normal (fan_out, relu) conv weights, norm
    weight 1 and bias 0.
    """

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, dilation=1,
                 norm="BN", act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = make_norm(norm, out_channels)
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.bn.weight, 1)
        nn.init.constant_(self.bn.bias, 0)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.activate(x) if self.activate is not None else x
