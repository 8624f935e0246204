"""ACFNet's Attentional Class Feature module and head (Zhang et al., ICCV 2019, arXiv 1909.09408).

There is no official code. Two forms are provided, with the same parameters
(`conv1.0` 1x1 conv without bias, `conv1.1` BatchNorm, `conv2` 1x1 conv with
bias), so a state_dict of one loads into the other:

mode="paper" (default), F [B, C, N] features, P [B, K, N] coarse logits:
  F' = ReLU(BN(conv1x1(F)))                        the CCB's channel reduction to C'
  p  = softmax over K of P at each pixel           the coarse segmentation's probabilities
  centre_k = sum_n p_kn F'_n / sum_n p_kn          class centre: probability-weighted MEAN of F'
  A_n = sum_k p_kn centre_k                        the CAB: the probabilities are the attention
  out = conv2(A)                                   1x1 conv with bias
  Decisions: the paper's centres are normalised by each class's probability
  mass (a mean, so it does not grow with image size or class area), and its
  class attention is the coarse probability map itself (no learned
  similarity), which is what both formulas above do. The reduction is a CBR as
  every conv of the head; conv2 keeps a bias, as the unofficial code's.
  Fused: centres = fastctx.ops.class_gather(F', P, "paper"); conv2 is folded
  into the values (conv2(sum_k p_k c_k) = sum_k p_k (W c_k + b) since
  sum_k p_k = 1) and out = fastctx.ops.class_attention(None, None, W c + b, P, 1.0).
  No [B, N, K] probability map, no C'-wide pre-conv map.

mode="unofficial": zrl4836/ACFNet `acf_Module`, reproduced exactly:
  F' = Dropout2d(0.2)(ReLU(BN(conv1x1(F))))
  E = P F'^T [B, K, C']                            on the RAW coarse logits (no softmax)
  att = softmax over C' of (max_C' E - E)
  out = conv2(att^T P)
  Fused: softmax(max - E) = softmax(-E) (a per-row shift), and conv2 is folded
  into one [C', K] matrix per image, out = (W att^T) P + b: a C' x K x N GEMM
  instead of C' x K x N plus the C' x C' x N conv.

ACFHead (ACFNet with an ASPP base network, the unofficial code's base):
  mmseg's ASPPHead layout (image_pool, aspp_modules, bottleneck) -> features F
  -> coarse classifier (Dropout2d + `conv_seg_coarse`) -> ACFModule(F, coarse)
  -> `acf_bottleneck` 3x3 CBR over cat[ACF output, F] -> Dropout2d + `conv_seg`.
  forward returns (logits, coarse logits).

Losses (fastctx.models.CoarseToFineEncoderDecoder, presets "acfnet_r*-d8"):
final CE 1.0 + coarse CE 0.4 + auxiliary FCN (stage 3) CE 0.4, mmseg-style
cross-entropy averaged over all pixels: the weights mmseg gives a decode head
and a deep-supervision head, so ACFNet trains like the other fastctx models.
The unofficial recipe (loss/criterion.py, CriterionOhemDSN) is 0.7 OHEM-CE
(final) + 0.6 CE (coarse) + 0.4 CE (auxiliary) + Lovasz-softmax on
softmax(final + coarse); as published its auxiliary term indexes a fourth
output the network does not return, i.e. it was never run, and the paper
gives no weights to check against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ._checks import check_input_dtype, check_positive_int
from .aspp_head import ASPPHead
from .conv_module import UNSET, ConvModule, make_norm
from .ocr_head import check_feats_probs

__all__ = ["ACFHead", "ACFModule"]

MODES = ("paper", "unofficial")


class ACFModule(nn.Module):
    """Attentional Class Feature module: class centres from a coarse segmentation, mixed back per pixel.

    Args:
        in_channels: channels of the features F.
        out_channels: C', the reduced channels (and the output's).
        num_classes: K, channels of the coarse logits.
        mode: "paper" or "unofficial" (see the module docstring).
        norm: "BN", "SyncBN", an mmseg norm_cfg dict or a norm-layer class (conv1's norm).
        fused: run fastctx's ops / folded convs (True) or the eager maths.
    forward(feats [B, in_channels, H, W], coarse [B, num_classes, H, W] logits) -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, mode: str = "paper", norm="BN",
                 fused: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ACFModule mode must be one of {MODES}, got {mode!r}")
        who = type(self).__name__
        self.in_channels = check_positive_int(in_channels, "in_channels", who)
        self.out_channels = check_positive_int(out_channels, "out_channels", who)
        self.num_classes = check_positive_int(num_classes, "num_classes", who)
        self.mode, self.fused = mode, fused
        if norm is None:
            raise ValueError(f"{who}: conv1 is conv -> norm -> ReLU (the unofficial layout conv1.{{0,1}}): it needs a "
                             "norm, got norm=None")
        layers = [nn.Conv2d(in_channels, out_channels, 1, bias=False), make_norm(norm, out_channels),
                  nn.ReLU(inplace=True)]
        if mode == "unofficial":
            layers.append(nn.Dropout2d(0.2))
        else:  # the unofficial code keeps PyTorch's default init for this conv; the paper form uses mmcv's
            nn.init.kaiming_normal_(layers[0].weight, mode="fan_out", nonlinearity="relu")
        self.conv1 = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 1)
        nn.init.kaiming_normal_(self.conv2.weight, a=1)  # the unofficial code's init
        nn.init.zeros_(self.conv2.bias)

    def forward(self, feats: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        check_feats_probs(feats, coarse, type(self).__name__, self.in_channels, self.num_classes)
        check_input_dtype(feats, self, type(self).__name__)
        reduced = self.conv1(feats)  # F' [B, C', H, W]
        if self.mode == "paper":
            return self._paper(reduced, coarse)
        return self._unofficial(reduced, coarse)

    def _paper(self, reduced: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        if self.fused:
            centres = ops.class_gather(reduced, coarse, "paper")          # [B, K, C']
            values = F.linear(centres, self.conv2.weight.flatten(1), self.conv2.bias)   # conv2 of each centre
            return ops.class_attention(None, None, values, coarse, 1.0)
        batch, channels, height, width = reduced.shape
        probs = F.softmax(coarse, dim=1).flatten(2)                       # [B, K, N]
        feats = reduced.flatten(2)                                        # [B, C', N]
        centres = torch.bmm(probs, feats.transpose(1, 2)) / probs.sum(2, keepdim=True)   # [B, K, C']
        attended = torch.bmm(centres.transpose(1, 2), probs)             # [B, C', N]
        return self.conv2(attended.view(batch, channels, height, width))

    def _unofficial(self, reduced: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = reduced.shape
        logits = coarse.flatten(2)                                        # P [B, K, N], raw
        if self.fused:
            energy = torch.bmm(logits, reduced.flatten(2).transpose(1, 2))   # [B, K, C']; transposed operand, no copy
            attention = F.softmax(-energy, dim=-1)                        # == softmax(max - energy)
            mix = torch.matmul(self.conv2.weight.flatten(1), attention.transpose(1, 2))   # W att^T [B, C', K]
            out = torch.baddbmm(self.conv2.bias[:, None], mix, logits)    # (W att^T) P + b
            return out.view(batch, channels, height, width)
        # zrl4836's acf_Module.forward
        proj_query = logits
        proj_key = reduced.view(batch, channels, -1).permute(0, 2, 1)
        energy = torch.bmm(proj_query, proj_key)
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        attention = F.softmax(energy_new, dim=-1)
        attention = attention.permute(0, 2, 1)
        out = torch.bmm(attention, logits)
        return self.conv2(out.view(batch, channels, height, width))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_classes={self.num_classes}, "
                f"mode={self.mode!r}, fused={self.fused}")


class ACFHead(ASPPHead):
    """ACFNet's head: ASPP base -> coarse logits -> ACF module -> 3x3 CBR over cat[ACF, features] -> conv_seg.

    Args:
        acf_channels: C' of the ACF module (512 at R50/R101, as the unofficial code).
        dilations: ASPP branches (mmseg's D8 configs: (1, 12, 24, 36)).
        mode: ACFModule mode, "paper" or "unofficial".
        fused: run the ACF module with fastctx's ops (the rest is convolutions).
        in_channels, channels, num_classes, dropout_ratio, conv_cfg, norm_cfg, act_cfg, norm, act, in_index,
        input_transform, align_corners, out_channels, threshold, loss_decode, ignore_index, sampler, init_cfg:
            as fastctx.nn.ASPPHead. The ACF module's reduction needs a norm
            (its layout is conv1.{0: conv, 1: norm}); the activation is ReLU there.
    forward(inputs) -> (logits, coarse logits), both [B, num_classes, H, W], in train and eval.
    """

    def __init__(self, acf_channels: int = 512, dilations=(1, 12, 24, 36), mode: str = "paper", *,
                 in_channels=2048, channels: int = 512, num_classes: int = 19, dropout_ratio: float = 0.1,
                 conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET, norm=UNSET, act=UNSET, in_index=-1,
                 input_transform: str | None = None, align_corners: bool = False, out_channels: int | None = None,
                 threshold=None, loss_decode=None, ignore_index: int = 255, sampler=None, init_cfg=None,
                 fused: bool = True):
        super().__init__(dilations, in_channels=in_channels, channels=channels, num_classes=num_classes,
                         dropout_ratio=dropout_ratio, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg,
                         norm=norm, act=act, in_index=in_index, input_transform=input_transform,
                         align_corners=align_corners, out_channels=out_channels, threshold=threshold,
                         loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler, init_cfg=init_cfg)
        self.acf_channels = check_positive_int(acf_channels, "acf_channels", type(self).__name__)
        channels, num_classes = self.channels, self.num_classes
        self.conv_seg_coarse = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg_coarse.weight, 0, 0.01)
        nn.init.constant_(self.conv_seg_coarse.bias, 0)
        self.acf_module = ACFModule(channels, acf_channels, num_classes, mode=mode, norm=self.norm_cfg, fused=fused)
        self.acf_bottleneck = ConvModule(acf_channels + channels, channels, 3, padding=1, norm=self.norm_cfg,
                                         act=self.act_cfg)

    @property
    def mode(self) -> str:
        return self.acf_module.mode

    @property
    def fused(self) -> bool:
        return self.acf_module.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.acf_module.fused = bool(value)

    def cls_seg_coarse(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg_coarse(feat)

    def forward(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._forward_feature(inputs)
        coarse = self.cls_seg_coarse(feats)
        context = self.acf_module(feats, coarse)
        out = self.acf_bottleneck(torch.cat([context, feats], dim=1))
        return self.cls_seg(out), coarse

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, acf_channels={self.acf_channels}, mode={self.mode!r}"
