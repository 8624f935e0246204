"""Drop-in EncNet modules (mmsegmentation 1.x `Encoding`, `EncModule`, `EncHead`).

Parameter names follow mmseg so its checkpoints load with strict=True:
`encoding.0.{codewords,scale}` (the Encoding layer), `encoding.1.*` (BatchNorm1d
over the K codewords), `fc.0.*`, `encoding_project.{conv,bn}.*`, and in the
head `bottleneck.*`, `enc_module.*`, `se_layer.*`, `conv_seg.*`.
With `fused=True` the Encoding layer runs fastctx.ops.encoding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops, reference
from ._batchnorm import SyncBatchNorm
from .conv_module import ConvModule
from .decode_head import DecodeHead


class Encoding(nn.Module):
    """Encoding layer: E [B, K, D] of a [B, D, H, W] map against K learned codewords."""

    def __init__(self, channels: int, num_codes: int, fused: bool = True):
        super().__init__()
        self.channels, self.num_codes, self.fused = channels, num_codes, fused
        std = 1.0 / ((num_codes * channels) ** 0.5)
        self.codewords = nn.Parameter(torch.empty(num_codes, channels).uniform_(-std, std))
        self.scale = nn.Parameter(torch.empty(num_codes).uniform_(-1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(f"Encoding expects input of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        if not self.fused:
            return reference.encoding(x, self.codewords, self.scale)
        codewords, scale = self.codewords, self.scale
        if not torch.is_autocast_enabled(x.device.type):
            # inside autocast the op takes the fp32 parameters as they are (no 16-bit rounding of codewords)
            codewords, scale = codewords.to(x.dtype), scale.to(x.dtype)
        return ops.encoding(x, codewords, scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_codes={self.num_codes}"


def _norm1d(norm, channels: int) -> nn.Module:
    """mmseg's EncModule swaps its 2-d norm for the 1-d one over the K codewords."""
    if isinstance(norm, str):
        name = norm.lower()
        if name in ("bn", "batchnorm"):
            return nn.BatchNorm1d(channels)
        if name == "syncbn":
            return SyncBatchNorm(channels)  # fastctx's: also synchronises CPU (gloo) training
        raise ValueError(f"norm must be 'BN', 'SyncBN' or a norm-layer class, got {norm!r}")
    if norm is nn.BatchNorm2d:
        return nn.BatchNorm1d(channels)
    return norm(channels)


class EncModule(nn.Module):
    """Context encoding module: channel-wise gating of x by its encoded global context."""

    def __init__(self, in_channels: int, num_codes: int, norm="BN", fused: bool = True):
        super().__init__()
        self.encoding_project = ConvModule(in_channels, in_channels, 1, norm=norm)
        self.encoding = nn.Sequential(
            Encoding(in_channels, num_codes, fused=fused), _norm1d(norm, num_codes), nn.ReLU(inplace=True)
        )
        self.fc = nn.Sequential(nn.Linear(in_channels, in_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor):
        """Returns (encoded feature e [B, C], gated output relu(x + x * sigmoid(fc(e))))."""
        encoding_projection = self.encoding_project(x)
        encoding_feat = self.encoding(encoding_projection).mean(dim=1)
        batch_size, channels, _, _ = x.size()
        gamma = self.fc(encoding_feat)
        y = gamma.view(batch_size, channels, 1, 1)
        return encoding_feat, F.relu_(x + x * y)


class EncHead(DecodeHead):
    """EncNet decode head (mmseg `EncHead`).

    Args:
        in_channels: channels of the backbone features used: an int (one
            feature) or a list such as [512, 1024, 2048] (mmseg's config; the
            last is the head's input, the others feed the laterals).
        channels: channels inside the head (512).
        num_classes: output classes.
        num_codes: codewords of the Encoding layer (32).
        use_se_loss: also return SE logits [B, num_classes] from `se_layer`.
        add_lateral: fuse the earlier features through lateral 1x1 convs.
        in_index: which backbone features to take from a list input (default:
            the last len(in_channels)).
        fused: run the Encoding layer with fastctx's fused op.
    Forward takes a list of backbone features (or one tensor) and returns
    (seg_logits, se_logits) when use_se_loss, else seg_logits -- in train and
    eval mode, as mmseg's forward does.
    """

    def __init__(self, in_channels=2048, channels: int = 512, num_classes: int = 19, num_codes: int = 32,
                 use_se_loss: bool = True, add_lateral: bool = False, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm="BN", fused: bool = True, in_index=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners)
        self.in_channels = list(in_channels) if isinstance(in_channels, Sequence) else [int(in_channels)]
        self.num_codes, self.use_se_loss, self.add_lateral = num_codes, use_se_loss, add_lateral
        n = len(self.in_channels)
        if in_index is None:
            in_index = tuple(range(-n, 0))
        self.in_index = (in_index,) if isinstance(in_index, int) else tuple(in_index)
        if len(self.in_index) != n:
            raise ValueError(f"in_index {self.in_index} must name one feature per in_channels {self.in_channels}")
        self.bottleneck = ConvModule(self.in_channels[-1], channels, 3, padding=1, norm=norm)
        if add_lateral:
            self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, norm=norm) for c in self.in_channels[:-1]])
            self.fusion = ConvModule(n * channels, channels, 3, padding=1, norm=norm)
        self.enc_module = EncModule(channels, num_codes=num_codes, norm=norm, fused=fused)
        if use_se_loss:
            self.se_layer = nn.Linear(channels, num_classes)

    @property
    def fused(self) -> bool:
        return self.enc_module.encoding[0].fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.enc_module.encoding[0].fused = bool(value)

    def _select(self, inputs) -> list[torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        if len(self.in_channels) > 1 and len(inputs) < len(self.in_channels):
            raise ValueError(f"EncHead with in_channels {self.in_channels} needs {len(self.in_channels)} "
                             f"features, got {len(inputs)}")
        feats = [inputs[i] for i in self.in_index] if len(self.in_channels) > 1 else [inputs[self.in_index[0]]]
        for f, c in zip(feats, self.in_channels):
            if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[1] != c:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(f"EncHead expects features of shape [B, {c}, H, W] (in_channels "
                                 f"{self.in_channels}), got {shape}")
        return feats

    def forward(self, inputs):
        feats = self._select(inputs)
        feat = self.bottleneck(feats[-1])
        if self.add_lateral:
            laterals = [
                F.interpolate(conv(feats[i]), size=feat.shape[2:], mode="bilinear", align_corners=self.align_corners)
                for i, conv in enumerate(self.lateral_convs)
            ]
            feat = self.fusion(torch.cat([feat, *laterals], 1))
        encode_feat, output = self.enc_module(feat)
        output = self.cls_seg(output)
        if self.use_se_loss:
            return output, self.se_layer(encode_feat)
        return output


def se_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Per-image class-presence vectors [B, num_classes] from label maps [B, H, W] (ignore_index excluded)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W] label maps, got shape {tuple(labels.shape)}")
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    present = torch.zeros(labels.shape[0], num_classes, dtype=torch.bool, device=labels.device)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None, None].expand_as(labels)
    present[rows[valid], labels[valid]] = True
    return present.float()


def se_loss(se_logits: torch.Tensor, labels: torch.Tensor, weight: float = 0.2, ignore_index: int = 255):
    """EncNet's semantic-encoding loss: BCE-with-logits vs class presence, mean over all entries, x weight."""
    targets = se_targets(labels, se_logits.shape[1], ignore_index).to(se_logits.dtype)
    return weight * F.binary_cross_entropy_with_logits(se_logits, targets)
