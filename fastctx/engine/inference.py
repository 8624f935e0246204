"""Inference modes of mmseg's EncoderDecoder: whole image, sliding window, multi-scale + flip TTA.

Every function takes a segmentor `model` whose `model(img)` returns logits
[B, K, H, W] at the input size, and an image batch img [B, 3, H, W].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["whole_inference", "slide_inference", "infer_logits", "tta_probabilities", "predict_classes"]


def _check_image(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or not img.is_floating_point():
        what = f"{tuple(img.shape)} {img.dtype}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"expected a float image batch [B, C, H, W], got {what}")


def whole_inference(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    """Logits of the whole image in one pass."""
    _check_image(img)
    return model(img)


def slide_inference(model: nn.Module, img: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int],
                    num_classes: int | None = None) -> torch.Tensor:
    """Logits from overlapping crop_size windows every stride pixels, overlaps averaged (mmseg slide_inference).

    Windows start at multiples of the stride; the last row/column is shifted
    back to end at the border, so every window lies inside the image (an image
    smaller than the crop is run whole). Each pixel's logits are the sum of the
    windows covering it divided by their count.
    """
    _check_image(img)
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    if min(crop_h, crop_w, stride_h, stride_w) < 1:
        raise ValueError(f"crop_size and stride must be positive, got {tuple(crop_size)} and {tuple(stride)}")
    batch, _, height, width = img.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    summed = None
    counts = img.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            logits = model(img[:, :, y1:y2, x1:x2])
            if summed is None:
                k = num_classes if num_classes is not None else logits.shape[1]
                summed = logits.new_zeros((batch, k, height, width))
            summed[:, :, y1:y2, x1:x2] += logits
            counts[:, :, y1:y2, x1:x2] += 1
    return summed / counts.to(summed.dtype)


def infer_logits(model: nn.Module, img: torch.Tensor, mode: str = "whole", crop_size: Sequence[int] | None = None,
                 stride: Sequence[int] | None = None) -> torch.Tensor:
    """Logits by `mode` "whole" or "slide" (slide needs crop_size; stride defaults to 2/3 of it)."""
    if mode == "whole":
        return whole_inference(model, img)
    if mode == "slide":
        if crop_size is None:
            raise ValueError("slide inference needs a crop_size [H, W]")
        if stride is None:
            stride = tuple(max(1, (2 * s) // 3) for s in crop_size)
        return slide_inference(model, img, crop_size, stride)
    raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")


def _resize(logits: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def tta_probabilities(model: nn.Module, img: torch.Tensor, out_size: Sequence[int], scales: Sequence[float] = (1.0,),
                      flip: bool = True, mode: str = "whole", crop_size: Sequence[int] | None = None,
                      stride: Sequence[int] | None = None, align_corners: bool = False) -> torch.Tensor:
    """Class probabilities [B, K, *out_size]: the mean softmax over scales x {no flip, horizontal flip}.

    As mmseg's SegTTAModel: each augmented image's logits are flipped back and
    resized (bilinear) to out_size, then softmaxed, and the softmaxes averaged.
    Scaled sizes round as mmcv's keep-ratio Resize does: int(size * scale + 0.5).
    """
    _check_image(img)
    height, width = img.shape[-2:]
    total, n = None, 0
    for scale in scales:
        size = (int(height * scale + 0.5), int(width * scale + 0.5))
        scaled = _resize(img, size, align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            logits = infer_logits(model, x, mode, crop_size, stride).float()
            if flipped:
                logits = logits.flip(-1)
            probs = _resize(logits, out_size, align_corners).softmax(dim=1)
            total = probs if total is None else total + probs
            n += 1
    return total / n


def predict_classes(model: nn.Module, img: torch.Tensor, out_size: Sequence[int], mode: str = "whole",
                    crop_size: Sequence[int] | None = None, stride: Sequence[int] | None = None, tta: bool = False,
                    tta_scales: Sequence[float] = (1.0,), tta_flip: bool = True,
                    align_corners: bool = False) -> torch.Tensor:
    """Class map [B, *out_size]: logits (or TTA probabilities) resized to out_size, then argmax."""
    if tta:
        scores = tta_probabilities(model, img, out_size, tta_scales, tta_flip, mode, crop_size, stride,
                                   align_corners)
    else:
        scores = _resize(infer_logits(model, img, mode, crop_size, stride).float(), out_size, align_corners)
    return scores.argmax(dim=1)
