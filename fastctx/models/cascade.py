"""Segmentors whose decode heads produce more than one prediction: OCRNet's cascade and ACFNet's coarse-to-fine head.

- `CascadeEncoderDecoder` is mmsegmentation 1.x's: `decode_head` is a
  ModuleList of stages, stage 0 maps the backbone features to logits and every
  later stage takes (features, previous stage's logits). The state_dict keys
  are mmseg's (`decode_head.{i}.*`), so an mmseg OCRNet checkpoint
  (decode_head.0 FCNHead, decode_head.1 OCRHead) loads with strict=True.
- `CoarseToFineEncoderDecoder` is an EncoderDecoder whose decode head returns
  (logits, coarse logits), as fastctx.nn.ACFHead does, with a cross-entropy on
  each (ACFNet's deep supervision of the coarse segmentation).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import seg_cross_entropy
from .segmentor import EncoderDecoder, _loss_weight

__all__ = ["CascadeEncoderDecoder", "CoarseToFineEncoderDecoder"]


def _logits(out, who: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{who} must return logits [B, num_classes, h, w], got {type(out).__name__}")
    return out


class CascadeEncoderDecoder(EncoderDecoder):
    """backbone -> decode stages (each refining the previous stage's logits) (+ auxiliary head), mmseg's losses.

    Args:
        backbone: returns a tuple of feature maps (e.g. ResNetV1c).
        decode_head: the stages, at least two: stage 0 is called head(features),
            stage i > 0 head(features, logits of stage i - 1); each returns logits.
        auxiliary_head: optional head on the features, used by `loss` only.
        num_classes: classes of every stage (default: the last stage's num_classes).
        align_corners: of the bilinear resizes of logits (must match the heads').
        decode_loss_weight: cross-entropy weight of each stage (None, or None for
            a stage: the head's mmseg loss_decode weight, else 1.0). OCRNet: (0.4, 1.0).
        aux_loss_weight: weight of the auxiliary head's cross-entropy (default: its
            loss_decode weight, else mmseg's 0.4).
        ignore_index: label value excluded from the losses.

    `loss` follows mmseg's CascadeEncoderDecoder to the op: stage 0's loss comes
    from its own forward, and the input of stage i > 0 comes from running stage
    i - 1 again (mmseg's `_decode_head_forward_train`), so those stages draw new
    dropout masks and update their BatchNorm running statistics a second time,
    and their parameters get the gradients of both uses. That is what released
    OCRNet models were trained with; `forward` (inference) runs each stage once.
    """

    def __init__(self, backbone: nn.Module, decode_head: Sequence[nn.Module], auxiliary_head: nn.Module | None = None,
                 *, num_classes: int | None = None, align_corners: bool = False,
                 decode_loss_weight: Sequence[float | None] | None = None, aux_loss_weight: float | None = None,
                 ignore_index: int = 255):
        if isinstance(decode_head, nn.Module) and not isinstance(decode_head, nn.ModuleList):
            raise TypeError("CascadeEncoderDecoder's decode_head is a list of stages, got one module "
                            f"({type(decode_head).__name__}); use EncoderDecoder for a single head")
        stages = list(decode_head)
        if len(stages) < 2:
            raise ValueError(f"CascadeEncoderDecoder needs at least two decode stages, got {len(stages)}")
        given = [None] * len(stages) if decode_loss_weight is None else list(decode_loss_weight)
        if len(given) != len(stages) or any(w is not None and w < 0 for w in given):
            raise ValueError(f"decode_loss_weight needs one weight >= 0 (or None) per stage ({len(stages)}), got "
                             f"{given}")
        weights = [_loss_weight(f"decode_loss_weight[{i}]", w, stage, "loss_weight", 1.0)
                   for i, (w, stage) in enumerate(zip(given, stages))]
        super().__init__(backbone, stages[-1], auxiliary_head, num_classes=num_classes, align_corners=align_corners,
                         decode_loss_weight=weights[-1], aux_loss_weight=aux_loss_weight, ignore_index=ignore_index)
        for i, stage in enumerate(stages[:-1]):
            if getattr(stage, "num_classes", self.num_classes) != self.num_classes:
                raise ValueError(f"decode_head.{i} predicts {stage.num_classes} classes, the segmentor "
                                 f"{self.num_classes}")
            if getattr(stage, "align_corners", align_corners) != align_corners:
                raise ValueError(f"decode_head.{i} has align_corners={stage.align_corners}, the segmentor "
                                 f"align_corners={align_corners}: they must agree")
        self.decode_head = nn.ModuleList(stages)  # replaces the last stage registered by EncoderDecoder
        self.decode_loss_weights = tuple(weights)

    @property
    def num_stages(self) -> int:
        return len(self.decode_head)

    @property
    def fused(self) -> bool:
        """Whether the stages with fastctx kernels (e.g. OCRHead) run them."""
        return any(bool(getattr(stage, "fused", False)) for stage in self.decode_head)

    @fused.setter
    def fused(self, value: bool) -> None:
        for stage in self.decode_head:
            if hasattr(stage, "fused"):
                stage.fused = bool(value)

    def _stage(self, i: int, feats, prev: torch.Tensor | None) -> torch.Tensor:
        stage = self.decode_head[i]
        return _logits(stage(feats) if i == 0 else stage(feats, prev), f"decode_head.{i}")

    def decode(self, feats) -> torch.Tensor:
        """The last stage's logits at the features' resolution."""
        out = self._stage(0, feats, None)
        for i in range(1, self.num_stages):
            out = self._stage(i, feats, out)
        return out

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """The last stage's logits [B, num_classes, H, W] at the input size."""
        logits = self.decode(self.extract_feat(img))
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def _losses(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmseg's training losses {"decode_{i}.loss_ce" for every stage, "aux.loss_ce"}; the total is their sum."""
        feats = self.extract_feat(img)
        ce = dict(ignore_index=self.ignore_index, align_corners=self.align_corners)
        weights = self.decode_loss_weights
        losses = {"decode_0.loss_ce": seg_cross_entropy(self._stage(0, feats, None), label, weights[0], **ce)}
        prev = None
        for i in range(1, self.num_stages):
            prev = self._stage(i - 1, feats, prev)  # mmseg runs the previous stage again for the next one's input
            losses[f"decode_{i}.loss_ce"] = seg_cross_entropy(self._stage(i, feats, prev), label, weights[i], **ce)
        if self.auxiliary_head is not None:
            aux_logits, _ = self._split(self.auxiliary_head(feats))
            losses["aux.loss_ce"] = seg_cross_entropy(aux_logits, label, self.aux_loss_weight, **ce)
        return losses

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decode_loss_weights={self.decode_loss_weights}"


class CoarseToFineEncoderDecoder(EncoderDecoder):
    """EncoderDecoder for a decode head returning (logits, coarse logits), e.g. ACFNet's ACFHead.

    Args: as EncoderDecoder, plus
        coarse_loss_weight: cross-entropy weight of the coarse logits (ACFNet presets: 0.4, the
            weight mmseg gives a deep-supervision head; see fastctx.nn.acf_head for the choice).
    `forward` returns the final logits at the input size.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None, *,
                 num_classes: int | None = None, align_corners: bool = False, decode_loss_weight: float | None = None,
                 coarse_loss_weight: float = 0.4, aux_loss_weight: float | None = None, ignore_index: int = 255):
        super().__init__(backbone, decode_head, auxiliary_head, num_classes=num_classes, align_corners=align_corners,
                         decode_loss_weight=decode_loss_weight, aux_loss_weight=aux_loss_weight,
                         ignore_index=ignore_index)
        if coarse_loss_weight < 0:
            raise ValueError(f"coarse_loss_weight must be >= 0, got {coarse_loss_weight}")
        self.coarse_loss_weight = float(coarse_loss_weight)

    def _fine_and_coarse(self, feats) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.decode_head(feats)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError("CoarseToFineEncoderDecoder's decode_head must return (logits, coarse logits), got "
                            f"{type(out).__name__}")
        return out[0], out[1]

    def _losses(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"decode.loss_ce", "decode.loss_coarse", "aux.loss_ce" (with an auxiliary head)}; the total is their sum."""
        feats = self.extract_feat(img)
        ce = dict(ignore_index=self.ignore_index, align_corners=self.align_corners)
        logits, coarse = self._fine_and_coarse(feats)
        losses = {"decode.loss_ce": seg_cross_entropy(logits, label, self.decode_loss_weight, **ce),
                  "decode.loss_coarse": seg_cross_entropy(coarse, label, self.coarse_loss_weight, **ce)}
        if self.auxiliary_head is not None:
            aux_logits, _ = self._split(self.auxiliary_head(feats))
            losses["aux.loss_ce"] = seg_cross_entropy(aux_logits, label, self.aux_loss_weight, **ce)
        return losses

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, coarse_loss_weight={self.coarse_loss_weight}"
