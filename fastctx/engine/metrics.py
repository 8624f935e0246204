"""Segmentation metrics from an accumulated confusion matrix, with mmseg's IoUMetric semantics.

Pixels labelled `ignore_index` are dropped. Per class c: IoU = |pred=c and
gt=c| / |pred=c or gt=c|, Acc = |pred=c and gt=c| / |gt=c|. A class absent
from both prediction and ground truth has IoU NaN (and Acc NaN when absent
from the ground truth); means skip NaNs (np.nanmean), as mmseg does.
aAcc = correct pixels / labelled pixels. Reported in percent, like mmseg.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["SegMetrics", "ConfusionMatrix", "intersect_and_union", "metrics_from_confusion", "format_metrics_table"]


def _confusion(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape "
                         "(resize the logits to the label size before argmax)")
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError(f"prediction and label must be integer class maps, got {pred.dtype} and {label.dtype}")
    label = label.long()
    pred = pred.long()
    valid = label != ignore_index
    label, pred = label[valid], pred[valid]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        bad = label[(label < 0) | (label >= num_classes)].unique()[:8].tolist()
        raise ValueError(f"label values must be in [0, {num_classes}) or ignore_index={ignore_index}, "
                         f"found {bad}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted classes must be in [0, {num_classes}), found {pred.min()}..{pred.max()}")
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255):
    """Per-class pixel counts (intersect, union, predicted, labelled) of one prediction, as mmseg returns them."""
    confusion = _confusion(pred, label, num_classes, ignore_index).double()
    intersect = confusion.diagonal()
    area_pred, area_label = confusion.sum(0), confusion.sum(1)
    return intersect, area_pred + area_label - intersect, area_pred, area_label


@dataclass
class SegMetrics:
    """Evaluation result (percent). iou / acc: per class, NaN where undefined."""

    aAcc: float
    mIoU: float
    mAcc: float
    iou: list[float]
    acc: list[float]
    class_names: list[str]
    num_pixels: int

    def summary(self) -> dict[str, float]:
        return {"aAcc": self.aAcc, "mIoU": self.mIoU, "mAcc": self.mAcc}

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        return {**{k: clean(v) for k, v in self.summary().items()},
                "IoU": {n: clean(v) for n, v in zip(self.class_names, self.iou)},
                "Acc": {n: clean(v) for n, v in zip(self.class_names, self.acc)},
                "num_pixels": self.num_pixels}


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return kept.mean().item() if kept.numel() else float("nan")


def metrics_from_confusion(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> SegMetrics:
    """SegMetrics of a [K, K] confusion matrix (rows: ground truth, columns: prediction)."""
    confusion = confusion.double()
    num_classes = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    intersect = confusion.diagonal()
    area_pred, area_label = confusion.sum(0), confusion.sum(1)
    union = area_pred + area_label - intersect
    # 0/0 -> NaN (class absent), as mmseg's numpy division gives.
    iou = intersect / union * 100
    acc = intersect / area_label * 100
    total = area_label.sum()
    aacc = (intersect.sum() / total * 100).item() if total > 0 else float("nan")
    return SegMetrics(aAcc=aacc, mIoU=_nanmean(iou), mAcc=_nanmean(acc), iou=iou.tolist(), acc=acc.tolist(),
                      class_names=names, num_pixels=int(total.item()))


class ConfusionMatrix:
    """Accumulates predictions against labels; `compute()` gives SegMetrics.

    `all_reduce()` sums the counts over torch.distributed processes (each one
    saw a disjoint shard of the images), so every process gets the global metrics.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one prediction (or a batch of them) of class indices against its label map."""
        self.counts += _confusion(pred, label, self.num_classes, self.ignore_index).cpu()

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # int64 counts: exact sums (gloo and nccl both reduce int64)
            counts = self.counts.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(counts)
            self.counts = counts.cpu()

    def compute(self) -> SegMetrics:
        return metrics_from_confusion(self.counts, self.class_names)


def format_metrics_table(metrics: SegMetrics, title: str | None = None) -> str:
    """A per-class IoU/Acc table followed by the summary line (aAcc, mIoU, mAcc)."""

    def pct(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.2f}"

    width = max([len("Class"), *(len(n) for n in metrics.class_names)])
    rule = f"+-{'-' * width}-+--------+--------+"
    lines = [title] if title else []
    lines += [rule, f"| {'Class':<{width}} |    IoU |    Acc |", rule]
    for name, iou, acc in zip(metrics.class_names, metrics.iou, metrics.acc):
        lines.append(f"| {name:<{width}} | {pct(iou):>6} | {pct(acc):>6} |")
    lines.append(rule)
    lines.append(f"aAcc {pct(metrics.aAcc)}  mIoU {pct(metrics.mIoU)}  mAcc {pct(metrics.mAcc)}  "
                 f"({metrics.num_pixels} labelled pixels)")
    return "\n".join(lines)
