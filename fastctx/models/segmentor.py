"""Encoder-decoder segmentor (mmsegmentation 1.x `EncoderDecoder`): backbone + decode head (+ auxiliary head).

Attribute names are mmseg's (`backbone`, `decode_head`, `auxiliary_head`) and
mmseg's data preprocessor holds no parameters, so the state_dict of an mmseg
EncoderDecoder (e.g. a released APCNet / EncNet / FCN checkpoint) loads here
with strict=True. Image normalisation is the data pipeline's job.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import check_label, se_loss, seg_cross_entropy

__all__ = ["EncoderDecoder"]


class EncoderDecoder(nn.Module):
    """backbone -> decode head (+ auxiliary head for training), with mmseg's losses.

    Args:
        backbone: returns a tuple of feature maps (e.g. ResNetV1c).
        decode_head: takes that tuple and returns logits [B, num_classes, h, w],
            or (logits, se_logits) for an EncHead with use_se_loss.
        auxiliary_head: optional head on the same features, used by `loss` only.
        num_classes: classes of the heads' outputs (default: decode_head.num_classes).
        align_corners: of the bilinear resizes of logits (must match the heads').
        decode_loss_weight: weight of the decode head's cross-entropy (default: the
            head's loss_decode weight if it was built with one, else mmseg's 1.0).
        aux_loss_weight: weight of the auxiliary head's cross-entropy (default: its
            loss_decode weight, else mmseg's 0.4).
        se_loss_weight: weight of EncNet's semantic-encoding loss (default: the
            head's loss_se_decode weight, else mmseg's 0.2).
        ignore_index: label value excluded from the losses (mmseg: 255).
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None, *,
                 num_classes: int | None = None, align_corners: bool = False, decode_loss_weight: float | None = None,
                 aux_loss_weight: float | None = None, se_loss_weight: float | None = None, ignore_index: int = 255):
        super().__init__()
        head_classes = getattr(decode_head, "num_classes", None)
        if num_classes is None:
            if head_classes is None:
                raise ValueError("num_classes is required when decode_head has no num_classes attribute")
            num_classes = head_classes
        for name, head in (("decode_head", decode_head), ("auxiliary_head", auxiliary_head)):
            if head is None:
                continue
            if getattr(head, "num_classes", num_classes) != num_classes:
                raise ValueError(f"{name} predicts {head.num_classes} classes, the segmentor {num_classes}")
            if getattr(head, "align_corners", align_corners) != align_corners:
                raise ValueError(f"{name} has align_corners={head.align_corners}, the segmentor "
                                 f"align_corners={align_corners}: they must agree")
            if getattr(head, "ignore_index", ignore_index) != ignore_index:
                raise ValueError(f"{name} has ignore_index={head.ignore_index}, the segmentor "
                                 f"ignore_index={ignore_index}: they must agree")
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = int(num_classes)
        self.align_corners = align_corners
        self.decode_loss_weight = _loss_weight("decode_loss_weight", decode_loss_weight, decode_head, "loss_weight",
                                               1.0)
        self.aux_loss_weight = _loss_weight("aux_loss_weight", aux_loss_weight, auxiliary_head, "loss_weight", 0.4)
        self.se_loss_weight = _loss_weight("se_loss_weight", se_loss_weight, decode_head, "se_loss_weight", 0.2)
        self.ignore_index = ignore_index

    @property
    def fused(self) -> bool:
        """Whether the decode head runs fastctx's fused kernels (False for heads without any, e.g. FCNHead)."""
        return bool(getattr(self.decode_head, "fused", False))

    @fused.setter
    def fused(self, value: bool) -> None:
        # Heads without fused kernels (FCNHead) always run eager PyTorch: nothing to switch.
        if hasattr(self.decode_head, "fused"):
            self.decode_head.fused = bool(value)

    def _check_img(self, img) -> None:
        channels = getattr(self.backbone, "in_channels", 3)
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"img must be a tensor [B, {channels}, H, W], got {type(img).__name__}")
        if img.dim() != 4 or img.shape[1] != channels:
            raise ValueError(f"img must be a batch of images [B, {channels}, H, W], got shape {tuple(img.shape)}")
        if not img.is_floating_point():
            raise TypeError(f"img must be a floating-point tensor (normalised images), got {img.dtype}")

    def extract_feat(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Backbone features of a batch of images [B, 3, H, W]."""
        self._check_img(img)
        return self.backbone(img)

    @staticmethod
    def _split(out):
        """(logits, se_logits or None) of a head's output."""
        return (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] at the input size (decode head only; EncHead's SE logits dropped)."""
        logits, _ = self._split(self.decode_head(self.extract_feat(img)))
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def loss(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmseg's training losses; the total loss is the sum of the values.

        Args:
            img: [B, 3, H, W] floating-point images.
            label: [B, H, W] integer label maps (ignore_index marks unlabelled pixels), any size.
        Returns:
            {"decode.loss_ce", "decode.loss_se" (EncHead with SE loss), "aux.loss_ce" (with an auxiliary head)}.
        """
        self._check_img(img)
        check_label(label, img.shape[0])
        try:
            return self._losses(img, label)
        except IndexError:  # F.cross_entropy: "Target 100 is out of bounds." -- say which ids, against what
            bad = label[(label < 0) | (label >= self.num_classes)]
            bad = bad[bad != self.ignore_index].unique()
            if bad.numel() == 0:
                raise
            shown = ", ".join(map(str, bad[:8].tolist())) + (", ..." if bad.numel() > 8 else "")
            raise ValueError(f"labels hold class ids {shown} outside 0..{self.num_classes - 1} for the "
                             f"{self.num_classes} classes ({self.ignore_index} = ignore)") from None

    def _losses(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.extract_feat(img)
        # Heads run in mmseg's order (decode, then auxiliary) so a seeded run draws the same dropout masks.
        logits, se_logits = self._split(self.decode_head(feats))
        losses = {"decode.loss_ce": seg_cross_entropy(logits, label, self.decode_loss_weight, self.ignore_index,
                                                      self.align_corners)}
        if se_logits is not None:
            losses["decode.loss_se"] = se_loss(se_logits, label, self.se_loss_weight, self.ignore_index)
        if self.auxiliary_head is not None:
            aux_logits, _ = self._split(self.auxiliary_head(feats))
            losses["aux.loss_ce"] = seg_cross_entropy(aux_logits, label, self.aux_loss_weight, self.ignore_index,
                                                      self.align_corners)
        return losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, align_corners={self.align_corners}"


def _loss_weight(name: str, given: float | None, head: nn.Module | None, attr: str, default: float) -> float:
    """A loss weight from the segmentor's argument or the head's mmseg loss config (they must agree)."""
    from_head = getattr(head, attr, None)
    if given is None:
        return default if from_head is None else from_head
    if from_head is not None and from_head != given:
        raise ValueError(f"{name}={given} but the head's loss config gives loss_weight={from_head}: set one of them")
    return float(given)
