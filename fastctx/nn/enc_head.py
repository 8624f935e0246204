"""Drop-in EncNet modules (mmsegmentation 1.x `Encoding`, `EncModule`, `EncHead`).

Parameter names follow mmseg so its checkpoints load with strict=True:
`encoding.0.{codewords,scale}` (the Encoding layer), `encoding.1.*` (BatchNorm1d
over the K codewords), `fc.0.*`, `encoding_project.{conv,bn}.*`, and in the
head `bottleneck.*`, `enc_module.*`, `se_layer.*`, `conv_seg.*`.
With `fused=True` the Encoding layer runs fastctx.ops.encoding.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops, reference
from ._checks import check_input_dtype, check_positive_int
from .conv_module import UNSET, ConvModule, build_norm, resolve_layer_args
from .decode_head import DecodeHead, loss_weight_from_cfg

__all__ = ["EncHead", "EncModule", "Encoding", "se_loss", "se_targets"]


class Encoding(nn.Module):
    """Encoding layer (mmseg `Encoding`): E [B, K, D] of features against K learned codewords.

    Input, channels on dim 1: a map [B, D, H, W], or [B, D, N] pixels as
    PyTorch-Encoding's `Encoding` module takes them. Mind the functional op:
    `fastctx.ops.encoding` reads a 3-D tensor as [B, N, D] (PyTorch-Encoding's
    functions' layout), so a square [B, D, D] tensor means different things to
    the module and to the op. Outside autocast, features and codewords of
    different float dtypes are promoted as the eager formula promotes them
    (fp16 features on an fp32 layer give fp32, fp64 features give fp64).
    """

    def __init__(self, channels: int, num_codes: int, fused: bool = True):
        super().__init__()
        self.channels = check_positive_int(channels, "channels", "Encoding")
        self.num_codes = check_positive_int(num_codes, "num_codes", "Encoding")
        self.fused = fused
        std = 1.0 / ((num_codes * channels) ** 0.5)
        self.codewords = nn.Parameter(torch.empty(num_codes, channels).uniform_(-std, std))
        self.scale = nn.Parameter(torch.empty(num_codes).uniform_(-1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Encoding expects a tensor [B, {self.channels}, H, W] or [B, {self.channels}, N], "
                            f"got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.size(1) != self.channels:
            raise ValueError(f"Encoding expects input of shape [B, {self.channels}, H, W] or [B, {self.channels}, N] "
                             f"(channels on dim 1), got {tuple(x.shape)}")
        if x.dim() == 3:
            x = x.unsqueeze(-1)  # [B, D, N, 1]: the same pixels as a map, a view
        if not self.fused:
            return reference.encoding(x, self.codewords, self.scale)
        codewords, scale = self.codewords, self.scale
        if not torch.is_autocast_enabled(x.device.type):
            # The eager formula's type promotion. (Inside autocast the op takes the fp32 parameters as they
            # are: no 16-bit rounding of codewords.)
            dtype = torch.promote_types(x.dtype, codewords.dtype)
            x, codewords, scale = x.to(dtype), codewords.to(dtype), scale.to(dtype)
        return ops.encoding(x, codewords, scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_codes={self.num_codes}"


def _codeword_norm(norm):
    """mmseg's EncModule norm over the K codewords: the 1-d version of the given norm, BatchNorm1d without one."""
    if norm is None:
        return "BN1d"
    if isinstance(norm, str):
        return norm.replace("2d", "1d")
    if isinstance(norm, Mapping) and isinstance(norm.get("type"), str):
        return {**norm, "type": norm["type"].replace("2d", "1d")}
    return norm  # a class: build_norm turns BatchNorm2d into BatchNorm1d


class EncModule(nn.Module):
    """Context encoding module (mmseg `EncModule`): channel-wise gating of x by its encoded global context.

    Arguments in mmseg's order: `in_channels, num_codes, conv_cfg, norm_cfg,
    act_cfg`; `norm=` / `act=` are the short forms. The norm over the K
    codewords is the 1-d version of the given norm (BatchNorm1d when there is
    none), as mmseg builds it.
    """

    def __init__(self, in_channels: int, num_codes: int, conv_cfg: dict | None = None, norm_cfg=UNSET,
                 act_cfg=UNSET, *, norm=UNSET, act=UNSET, fused: bool = True):
        super().__init__()
        who = type(self).__name__
        check_positive_int(in_channels, "in_channels", who)
        check_positive_int(num_codes, "num_codes", who)
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.in_channels = in_channels
        self.encoding_project = ConvModule(in_channels, in_channels, 1, norm=norm, act=act)
        self.encoding = nn.Sequential(
            Encoding(in_channels, num_codes, fused=fused),
            build_norm(_codeword_norm(norm), num_codes, dims=1),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(nn.Linear(in_channels, in_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor):
        """Returns (encoded feature e [B, C], gated output relu(x + x * sigmoid(fc(e))))."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"EncModule expects input of shape [B, {self.in_channels}, H, W], got {shape}")
        check_input_dtype(x, self, "EncModule")
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
        norm: "BN", "SyncBN", an mmseg norm_cfg dict, a norm-layer class, or
            None (convs with bias, no norm). Default "BN".
        fused: run the Encoding layer with fastctx's fused op.
        conv_cfg, norm_cfg, act_cfg: mmseg's layer configs (norm_cfg is the
            same as `norm`; mmseg's own default is norm_cfg=None, fastctx's is
            BatchNorm).
        loss_se_decode: mmseg's SE loss config (sigmoid CrossEntropyLoss); its
            loss_weight is `se_loss_weight`, used by EncoderDecoder.
        out_channels, threshold, loss_decode, ignore_index, sampler, init_cfg:
            mmseg's BaseDecodeHead arguments, accepted for what fastctx builds.
    Forward takes a list of backbone features (or one tensor) and returns
    (seg_logits, se_logits) when use_se_loss, else seg_logits -- in train and
    eval mode, as mmseg's forward does.
    """

    def __init__(self, in_channels=2048, channels: int = 512, num_classes: int = 19, num_codes: int = 32,
                 use_se_loss: bool = True, add_lateral: bool = False, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm=UNSET, fused: bool = True, in_index=None, *,
                 conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET, act=UNSET, loss_se_decode=None,
                 out_channels: int | None = None, threshold=None, loss_decode=None, ignore_index: int = 255,
                 sampler=None, init_cfg=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        who = type(self).__name__
        in_channels = list(in_channels) if isinstance(in_channels, Sequence) else [in_channels]
        if not in_channels:
            raise ValueError(f"{who}: in_channels must name at least one feature's channels, got []")
        self.in_channels = [check_positive_int(c, "in_channels", who) for c in in_channels]
        self.num_codes = check_positive_int(num_codes, "num_codes", who)
        self.use_se_loss, self.add_lateral = use_se_loss, add_lateral
        self.se_loss_weight = loss_weight_from_cfg(loss_se_decode, who, "loss_se_decode", use_sigmoid=True,
                                                   loss_name="loss_ce")
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        n = len(self.in_channels)
        if in_index is None:
            in_index = tuple(range(-n, 0))
        self.in_index = (in_index,) if isinstance(in_index, int) else tuple(in_index)
        if len(self.in_index) != n:
            raise ValueError(f"in_index {self.in_index} must name one feature per in_channels {self.in_channels}")
        self.bottleneck = ConvModule(self.in_channels[-1], channels, 3, padding=1, **layers)
        if add_lateral:
            self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, **layers) for c in self.in_channels[:-1]])
            self.fusion = ConvModule(n * channels, channels, 3, padding=1, **layers)
        self.enc_module = EncModule(channels, num_codes, conv_cfg, norm, act, fused=fused)
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
            check_input_dtype(f, self, "EncHead")
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
