"""Segmentation losses with mmsegmentation 1.x semantics (docs/design.md 2.5).

- `seg_cross_entropy`: mmseg's `CrossEntropyLoss` (use_sigmoid=False,
  avg_non_ignore=False) applied as its decode heads do: logits resized
  bilinearly to the label size, per-pixel CE with ignored pixels contributing 0,
  averaged over ALL pixels (ignored ones included), times the loss weight.
- `se_loss` (re-exported from fastctx.nn): EncNet's semantic-encoding loss,
  BCE-with-logits against per-image class presence.
- `ohem_pixel_weight`: mmseg's `OHEMPixelSampler` (with a threshold): the 0/1
  per-pixel weight of online hard example mining, for `seg_cross_entropy`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.enc_head import se_loss, se_targets

__all__ = ["seg_cross_entropy", "se_loss", "se_targets", "check_label", "ohem_pixel_weight"]

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
                      align_corners: bool = False, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """weight * mean over all pixels of CE(resize(logits, label size), label); ignored pixels count as 0.

    Args:
        logits: [B, C, h, w] raw class scores at any resolution.
        label: [B, H, W] integer class indices; `ignore_index` marks unlabelled pixels.
        weight: loss weight (mmseg: 1.0 for the decode head, 0.4 for the auxiliary FCN head).
        ignore_index: label value excluded from the loss (still counted in the average).
        align_corners: of the bilinear resize (the head's setting).
        pixel_weight: optional [B, H, W] weight of each pixel's CE (mmseg's seg_weight, e.g. from
            `ohem_pixel_weight`); the average is still over all pixels, as mmseg's.
    """
    check_label(label, logits.shape[0])
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, C, h, w], got shape {tuple(logits.shape)}")
    if logits.shape[2:] != label.shape[1:]:
        logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=align_corners)
    per_pixel = F.cross_entropy(logits, label.long(), reduction="none", ignore_index=ignore_index)
    if pixel_weight is not None:
        if pixel_weight.shape != label.shape:
            raise ValueError(f"pixel_weight must have the label's shape {tuple(label.shape)}, got "
                             f"{tuple(pixel_weight.shape)}")
        per_pixel = per_pixel * pixel_weight.to(per_pixel.dtype)
    # avg_non_ignore=False: divide by every pixel, not by the labelled ones (mmseg's default). mmseg's
    # weight_reduce_loss adds float32's eps to that count; kept so the losses match mmseg's to the last digit.
    return weight * (per_pixel.sum() / (label.numel() + _MMSEG_AVG_EPS))


@torch.no_grad()
def ohem_pixel_weight(logits: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int,
                      ignore_index: int = 255) -> torch.Tensor:
    """mmseg's OHEMPixelSampler(thresh, min_kept): 1 for the hard pixels, 0 elsewhere, [B, H, W] in logits' dtype.

    A labelled pixel is kept when the softmax probability of its true class is
    below max(thresh, p_k), p_k being the (min_kept * B)-th smallest of those
    probabilities over the batch (the largest one when there are fewer
    labelled pixels), so at least min_kept pixels per image are kept when they
    exist; ignored pixels get 0. No gradient flows through the selection.

    Args:
        logits: [B, C, H, W] at the label's size (resize first, as mmseg's heads do).
        label: [B, H, W] class indices, `ignore_index` for unlabelled pixels.
    """
    check_label(label, logits.shape[0])
    if logits.dim() != 4 or logits.shape[2:] != label.shape[1:]:
        raise ValueError(f"ohem_pixel_weight expects logits [B, C, H, W] at the label's size {tuple(label.shape)}, "
                         f"got {tuple(logits.shape)}")
    label = label.long()
    valid = label != ignore_index
    target = torch.where(valid, label, torch.zeros_like(label)).unsqueeze(1)
    prob = logits.softmax(dim=1).gather(1, target).squeeze(1)
    # The k-th smallest labelled probability without a data-dependent shape or a host sync (so torch.compile
    # keeps one graph): ignored pixels sort last as +inf, and k is clamped to the labelled count on the device.
    ranked = torch.where(valid, prob, torch.full_like(prob, float("inf"))).flatten().sort().values
    index = (valid.sum() - 1).clamp(min=0, max=min_kept * label.shape[0])
    threshold = ranked.gather(0, index.view(1)).clamp(min=thresh)
    return (valid & (prob < threshold)).to(prob.dtype)
