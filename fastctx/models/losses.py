"""Segmentation losses with mmsegmentation 1.x semantics (docs/design.md 2.5).

- `seg_cross_entropy`: mmseg's `CrossEntropyLoss` (use_sigmoid=False,
  avg_non_ignore=False) applied as its decode heads do: logits resized
  bilinearly to the label size, per-pixel CE with ignored pixels contributing 0,
  averaged over ALL pixels (ignored ones included), times the loss weight.
- `se_loss` (re-exported from fastctx.nn): EncNet's semantic-encoding loss,
  BCE-with-logits against per-image class presence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.enc_head import se_loss, se_targets

__all__ = ["seg_cross_entropy", "se_loss", "se_targets", "check_label"]

_MMSEG_AVG_EPS = torch.finfo(torch.float32).eps


def check_label(label: torch.Tensor, batch: int | None = None) -> None:
    """Raise a clear error unless `label` is a [B, H, W] integer label map (with B == batch when given)."""
    if not isinstance(label, torch.Tensor):
        raise TypeError(f"label must be a tensor [B, H, W] of class indices, got {type(label).__name__}")
    if label.dim() != 3:
        raise ValueError(f"label must be a [B, H, W] map of class indices, got shape {tuple(label.shape)}")
    if label.dtype == torch.bool or label.is_floating_point() or label.is_complex():
        raise TypeError(f"label must hold integer class indices (e.g. torch.int64), got {label.dtype}")
    if batch is not None and label.shape[0] != batch:
        raise ValueError(f"label batch size {label.shape[0]} does not match the images' batch size {batch}")


def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor, weight: float = 1.0, ignore_index: int = 255,
                      align_corners: bool = False) -> torch.Tensor:
    """weight * mean over all pixels of CE(resize(logits, label size), label); ignored pixels count as 0.

    Args:
        logits: [B, C, h, w] raw class scores at any resolution.
        label: [B, H, W] integer class indices; `ignore_index` marks unlabelled pixels.
        weight: loss weight (mmseg: 1.0 for the decode head, 0.4 for the auxiliary FCN head).
        ignore_index: label value excluded from the loss (still counted in the average).
        align_corners: of the bilinear resize (the head's setting).
    """
    check_label(label, logits.shape[0])
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, h, w], got shape {tuple(logits.shape)}")
    if logits.shape[2:] != label.shape[1:]:
        logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=align_corners)
    per_pixel = F.cross_entropy(logits, label.long(), reduction="none", ignore_index=ignore_index)
    # avg_non_ignore=False: divide by every pixel, not by the labelled ones (mmseg's default). mmseg's
    # weight_reduce_loss adds float32's eps to that count; kept so the losses match mmseg's to the last digit.
    return weight * (per_pixel.sum() / (label.numel() + _MMSEG_AVG_EPS))
