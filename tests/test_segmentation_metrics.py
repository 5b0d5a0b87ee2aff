from __future__ import annotations

import numpy as np
import pytest

from scellst.bench import evaluate_segmentation


def _two_squares() -> np.ndarray:
    lab = np.zeros((20, 20), dtype=np.int32)
    lab[2:6, 2:6] = 1
    lab[10:16, 10:16] = 2
    return lab


def test_perfect_segmentation_scores_one():
    lab = _two_squares()
    m = evaluate_segmentation(lab * 7, lab)  # label values do not matter
    for k in ("precision", "recall", "f1", "dice", "aji", "pq", "sq", "dq"):
        assert m[k] == pytest.approx(1.0), k
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)


def test_known_values():
    true = _two_squares()
    pred = np.zeros_like(true)
    pred[2:6, 2:5] = 1  # 12 of 16 px: IoU 0.75
    pred[10:13, 10:16] = 2  # 18 of 36 px: IoU 0.5 -> not a match at > 0.5
    pred[0:2, 18:20] = 3  # false positive, 4 px
    m = evaluate_segmentation(pred, true)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert m["sq"] == pytest.approx(0.75)
    assert m["pq"] == pytest.approx(0.75 * 1 / (1 + 1 + 0.5))
    assert m["dice"] == pytest.approx(2 * 30 / (52 + 34))
    # AJI: (12 + 18) / (16 + 36 + 4)
    assert m["aji"] == pytest.approx(30 / 56)


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        evaluate_segmentation(np.zeros((3, 3), int), np.zeros((4, 4), int))
    with pytest.raises(TypeError, match="integer"):
        evaluate_segmentation(np.zeros((3, 3)), np.zeros((3, 3), int))


def test_per_class_f1():
    true = _two_squares()
    pred = true.copy()
    m = evaluate_segmentation(pred, true, pred_classes={1: "a", 2: "a"}, true_classes={1: "a", 2: "b"})
    assert m["per_class_f1"]["a"] == pytest.approx(2 / (2 + 1))  # tp 1, fp 1
    assert m["per_class_f1"]["b"] == pytest.approx(0.0)
