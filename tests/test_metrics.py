"""Segmentation metrics: hand-computed confusion matrices and mmseg's IoUMetric as oracles."""
import math

import numpy as np
import pytest
import torch

from fastctx.engine.metrics import (ConfusionMatrix, format_metrics_table, intersect_and_union,
                                    metrics_from_confusion)
from mmseg_compat import import_decode_heads
from tolerances import assert_close

F64 = torch.float64


def _hand_case():
    # 3 classes; class 2 never appears in the labels, class 1 is never predicted correctly.
    label = torch.tensor([[0, 0, 1, 255],
                          [0, 1, 1, 255],
                          [0, 0, 0, 0]])
    pred = torch.tensor([[0, 1, 0, 2],
                         [0, 2, 0, 0],
                         [0, 0, 2, 0]])
    return pred, label


def test_intersect_and_union_hand_computed():
    pred, label = _hand_case()
    # Labelled pixels (10): gt 0 x7, gt 1 x3. Predictions on them: gt0 -> 0 x5, 1 x1, 2 x1; gt1 -> 0 x2, 2 x1.
    intersect, union, area_pred, area_label = intersect_and_union(pred, label, 3)
    assert intersect.tolist() == [5, 0, 0]
    assert area_pred.tolist() == [7, 1, 2]
    assert area_label.tolist() == [7, 3, 0]
    assert union.tolist() == [9, 4, 2]


def test_metrics_hand_computed():
    pred, label = _hand_case()
    cm = ConfusionMatrix(3, class_names=["a", "b", "c"])
    cm.update(pred, label)
    assert cm.counts.tolist() == [[5, 1, 1], [2, 0, 1], [0, 0, 0]]
    m = cm.compute()
    assert m.iou[0] == pytest.approx(500 / 9) and m.iou[1] == 0.0 and m.iou[2] == 0.0
    assert m.acc[0] == pytest.approx(500 / 7) and m.acc[1] == 0.0 and math.isnan(m.acc[2])
    assert m.aAcc == pytest.approx(50.0)
    assert m.mIoU == pytest.approx((500 / 9) / 3)          # class 2 predicted but absent: IoU 0, counted
    assert m.mAcc == pytest.approx((500 / 7) / 2)          # Acc NaN for class 2: skipped
    assert m.num_pixels == 10


def test_class_absent_from_prediction_and_label_is_nan_and_excluded():
    label = torch.tensor([[0, 1], [1, 255]])
    pred = torch.tensor([[0, 1], [0, 3]])  # class 3 only where the label is ignored; class 2 nowhere
    m = metrics_from_confusion(_counts(pred, label, 4))
    assert math.isnan(m.iou[2]) and math.isnan(m.iou[3])
    assert m.iou[0] == pytest.approx(50.0) and m.iou[1] == pytest.approx(50.0)
    assert m.mIoU == pytest.approx(50.0)


def _counts(pred, label, k):
    cm = ConfusionMatrix(k)
    cm.update(pred, label)
    return cm.counts


def test_accumulation_equals_one_confusion_of_all_pixels():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 5, (7, 9), generator=g) for _ in range(4)]
    labels = [torch.randint(0, 5, (7, 9), generator=g) for _ in range(4)]
    labels[1][2:4] = 255
    cm = ConfusionMatrix(5)
    for p, lab in zip(preds, labels):
        cm.update(p, lab)
    assert torch.equal(cm.counts, _counts(torch.cat(preds), torch.cat(labels), 5))
    batched = ConfusionMatrix(5)
    batched.update(torch.stack(preds), torch.stack(labels))
    assert torch.equal(batched.counts, cm.counts)


def _mmseg_iou_metric():
    assert import_decode_heads() is not None, "mmseg is installed: the parity test must run"
    from mmseg.evaluation.metrics import IoUMetric

    return IoUMetric


def test_matches_mmseg_iou_metric():
    IoUMetric = _mmseg_iou_metric()
    g = torch.Generator().manual_seed(1)
    k = 6
    cm = ConfusionMatrix(k)
    totals = [torch.zeros(k, dtype=F64) for _ in range(4)]
    for i in range(5):
        h, w = 11 + i, 13
        label = torch.randint(0, k - 1, (h, w), generator=g)  # class k-1 never labelled
        label[torch.rand(h, w, generator=g) < 0.2] = 255
        pred = torch.randint(0, k - 2, (h, w), generator=g)   # classes k-2, k-1 never predicted
        cm.update(pred, label)
        for t, area in zip(totals, IoUMetric.intersect_and_union(pred, label, k, 255)):
            t += area.to(F64)
        ours = intersect_and_union(pred, label, k)
        ref = IoUMetric.intersect_and_union(pred, label, k, 255)
        for a, b in zip(ours, ref):
            assert_close(a, b.to(F64), F64)
    with np.errstate(invalid="ignore"):  # 0/0 -> NaN is the point of the absent class
        ref = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    m = cm.compute()
    assert m.aAcc == pytest.approx(float(ref["aAcc"]) * 100, rel=1e-12)
    np.testing.assert_allclose(np.array(m.iou), ref["IoU"] * 100, rtol=1e-12)
    np.testing.assert_allclose(np.array(m.acc), ref["Acc"] * 100, rtol=1e-12)
    assert math.isnan(m.iou[k - 1])  # absent from both prediction and label
    # mmseg's IoUMetric.compute_metrics: np.nanmean of the per-class values
    assert m.mIoU == pytest.approx(float(np.nanmean(ref["IoU"])) * 100, rel=1e-12)
    assert m.mAcc == pytest.approx(float(np.nanmean(ref["Acc"])) * 100, rel=1e-12)


def test_bad_inputs_are_rejected_with_a_clear_message():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\) or ignore_index=255, found \[7\]"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 255]]))
    with pytest.raises(TypeError, match="integer class maps"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        metrics_from_confusion(torch.zeros(2, 2), ["a", "b", "c"])


def test_table_lists_every_class_and_the_summary():
    pred, label = _hand_case()
    cm = ConfusionMatrix(3, class_names=["road", "car", "sky"])
    cm.update(pred, label)
    text = format_metrics_table(cm.compute(), title="val")
    lines = text.splitlines()
    assert lines[0] == "val"
    assert any(line.startswith("| road ") and "55.56" in line and "71.43" in line for line in lines)
    assert any(line.startswith("| sky ") and "nan" in line for line in lines)
    assert lines[-1].startswith("aAcc 50.00  mIoU 18.52  mAcc 35.71")
    d = cm.compute().to_dict()
    assert d["Acc"]["sky"] is None and d["IoU"]["road"] == pytest.approx(500 / 9)
