"""Reference of class_gather: one feature vector per class, gathered over the pixels.

    "ocr"    mmsegmentation's SpatialGatherModule (ocr_head.py), line for line: per class k,
             w_k = softmax over pixels of scale * probs[b, k]; centre_k = sum_n w_kn feats[:, n].
    "paper"  ACFNet's class centre (arXiv 1909.09408): p = softmax over classes of scale * probs at
             each pixel; centre_k = sum_n p_kn feats[:, n] / sum_n p_kn.

feats [B, C, H, W], probs [B, K, H, W] (coarse logits) -> centres [B, K, C].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("ocr", "paper")


def class_gather(feats: torch.Tensor, probs: torch.Tensor, mode: str, scale: float = 1.0) -> torch.Tensor:
    batch_size, num_classes, height, width = probs.size()
    channels = feats.size(1)
    probs = probs.view(batch_size, num_classes, -1)
    feats = feats.view(batch_size, channels, -1).permute(0, 2, 1)  # [B, N, C]
    if mode == "ocr":
        weights = F.softmax(scale * probs, dim=2)  # over pixels
        return torch.matmul(weights, feats)  # [B, K, C]
    if mode == "paper":
        weights = F.softmax(scale * probs, dim=1)  # over classes, per pixel
        return torch.matmul(weights, feats) / weights.sum(dim=2, keepdim=True)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
