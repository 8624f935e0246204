"""Evaluate a segmentor on a dataset: inference per image, confusion matrix, mIoU / aAcc / mAcc."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .distributed import DistInfo
from .inference import predict_classes
from .metrics import ConfusionMatrix, SegMetrics
from .sampler import ShardSampler, collate_samples

__all__ = ["evaluate", "autocast_context"]


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for runtime.amp ("none", "bf16", "fp16"), or a null context."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, mode: str = "whole", crop_size: Sequence[int] | None = None,
             stride: Sequence[int] | None = None, tta: bool = False, tta_scales: Sequence[float] = (1.0,),
             tta_flip: bool = True, device: torch.device | str = "cpu", amp: str = "none",
             dist_info: DistInfo | None = None, num_workers: int = 0,
             progress: Callable[[int, int], None] | None = None) -> SegMetrics:
    """mIoU, per-class IoU, aAcc and mAcc of `model` on `dataset` (batch 1: images may differ in size).

    Each image's logits (whole, slide, or the TTA-averaged softmax) are resized
    bilinearly to its label's size before the argmax, so the metrics are at the
    label's resolution. Under torch.distributed each process evaluates a
    disjoint shard and the pixel counts are summed, so every process returns
    the metrics of the whole dataset. The model's train/eval mode is restored.
    """
    device = torch.device(device)
    rank, world_size = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    num_classes = getattr(dataset, "num_classes", None) or getattr(model, "num_classes")
    confusion = ConfusionMatrix(num_classes, getattr(dataset, "ignore_index", 255), getattr(dataset, "classes", None))
    loader = DataLoader(dataset, batch_size=1, sampler=ShardSampler(len(dataset), world_size, rank),
                        num_workers=num_workers, collate_fn=collate_samples, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # own generator: never draws from the global RNG
    align_corners = bool(getattr(model, "align_corners", False))
    dtype = next(model.parameters()).dtype  # a float64 model gets float64 images
    was_training = model.training
    model.eval()
    try:
        total = len(loader)
        for step, batch in enumerate(loader, 1):
            img = batch["img"].to(device, dtype, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with autocast_context(device, amp):
                pred = predict_classes(model, img, label.shape[-2:], mode=mode, crop_size=crop_size, stride=stride,
                                       tta=tta, tta_scales=tta_scales, tta_flip=tta_flip, align_corners=align_corners)
            confusion.update(pred, label)
            if progress is not None:
                progress(step, total)
        confusion.all_reduce()
        return confusion.compute()
    finally:
        model.train(was_training)
