"""What mmseg's BaseDecodeHead gives every head here: Dropout2d, the `conv_seg` classifier, its arguments.

fastctx heads compute logits; the losses are computed by
`fastctx.models.EncoderDecoder` with mmseg's semantics. BaseDecodeHead's
keyword arguments are accepted so an mmseg head config builds as it is; the
ones describing something fastctx does not build (binary heads, pixel
samplers, other losses or initialisations) are refused with a message instead
of being ignored.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ._checks import check_dropout, check_positive_int

__all__ = ["DecodeHead", "loss_weight_from_cfg"]

# mmseg's BaseDecodeHead init_cfg, which is the initialisation done here.
MMSEG_INIT_CFG = dict(type="Normal", std=0.01, override=dict(name="conv_seg"))


def loss_weight_from_cfg(cfg, who: str, key: str, use_sigmoid: bool, loss_name: str) -> float | None:
    """The loss_weight of an mmseg CrossEntropyLoss config computing what EncoderDecoder computes (None: no cfg).

    Only the loss fastctx computes is accepted: CrossEntropyLoss with
    `use_sigmoid` as given (softmax CE for segmentation, sigmoid BCE for
    EncNet's SE loss), mean reduction, no class weights, averaged over all
    pixels (avg_non_ignore=False).
    """
    if cfg is None:
        return None
    expected = (f"dict(type='CrossEntropyLoss', use_sigmoid={use_sigmoid}, loss_weight=w) (fastctx's "
                f"EncoderDecoder computes that loss)")
    if not isinstance(cfg, Mapping) or cfg.get("type") != "CrossEntropyLoss":
        raise ValueError(f"{who}: {key} must be {expected}, got {cfg!r}")
    defaults = dict(use_sigmoid=False, use_mask=False, reduction="mean", class_weight=None, avg_non_ignore=False,
                    loss_name=loss_name)
    wanted = {**defaults, "use_sigmoid": use_sigmoid}
    unknown = set(cfg) - set(defaults) - {"type", "loss_weight"}
    differing = {k: cfg[k] for k in wanted if k in cfg and cfg[k] != wanted[k]}
    if unknown or differing:
        raise ValueError(f"{who}: {key} must be {expected}; unsupported setting(s) "
                         f"{sorted(unknown) or differing}")
    weight = cfg.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"{who}: {key} loss_weight must be a number >= 0, got {weight!r}")
    return float(weight)


class DecodeHead(nn.Module):
    """Owns `dropout` and `conv_seg` (initialised Normal(0, 0.01), bias 0, as mmseg).

    `loss_weight` is the weight of an mmseg `loss_decode` config (None when not
    given); EncoderDecoder uses it when its own decode/aux weight is not set.
    """

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1, align_corners: bool = False, *,
                 out_channels: int | None = None, threshold: float | None = None, loss_decode=None,
                 ignore_index: int = 255, sampler=None, init_cfg=None):
        super().__init__()
        who = type(self).__name__
        check_positive_int(channels, "channels", who)
        check_positive_int(num_classes, "num_classes", who)
        dropout_ratio = check_dropout(dropout_ratio, who)
        if out_channels is not None and out_channels != num_classes:
            raise ValueError(f"{who}: out_channels must equal num_classes ({num_classes}) or be None, got "
                             f"{out_channels!r}; mmseg's binary form (out_channels=1 with a threshold) is not built "
                             "by fastctx")
        if threshold is not None:
            raise ValueError(f"{who}: threshold belongs to mmseg's binary heads (out_channels=1), which fastctx does "
                             f"not build; got threshold={threshold!r}")
        if sampler is not None:
            raise ValueError(f"{who}: pixel samplers (sampler={sampler!r}) are not supported: fastctx's "
                             "EncoderDecoder computes mmseg's loss over all pixels")
        if init_cfg is not None and init_cfg != MMSEG_INIT_CFG:
            raise ValueError(f"{who}: init_cfg must be None or mmseg's default {MMSEG_INIT_CFG!r} (the "
                             f"initialisation fastctx does), got {init_cfg!r}")
        self.loss_weight = loss_weight_from_cfg(loss_decode, who, "loss_decode", use_sigmoid=False,
                                                loss_name="loss_ce")
        self.channels, self.num_classes, self.align_corners = channels, num_classes, align_corners
        self.out_channels, self.ignore_index, self.dropout_ratio = num_classes, ignore_index, dropout_ratio
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.constant_(self.conv_seg.bias, 0)

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)
