"""Instance segmentation metrics: detection F1 at IoU > 0.5, Dice, AJI and PQ."""

from __future__ import annotations

import numpy as np


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive labels 1..n (0 stays background), and the original value of each new label."""
    values, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape)
    if labels.min() != 0:  # no background pixel: shift so that 0 stays free
        out = out + 1
        values = np.concatenate([[0], values])
    return out, values


def _overlaps(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Areas of the true and predicted instances and their pairwise intersections (sparse)."""
    t, p = true.ravel(), pred.ravel()
    area_t = np.bincount(t)[1:]
    area_p = np.bincount(p)[1:]
    both = (t > 0) & (p > 0)
    key = t[both].astype(np.int64) * (int(p.max()) + 1) + p[both]
    pairs, inter = np.unique(key, return_counts=True)
    ti = (pairs // (int(p.max()) + 1)).astype(int) - 1
    pi = (pairs % (int(p.max()) + 1)).astype(int) - 1
    return area_t, area_p, ti, pi, inter


def evaluate_segmentation(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    *,
    iou_threshold: float = 0.5,
    pred_classes: dict | None = None,
    true_classes: dict | None = None,
) -> dict:
    """Compare a predicted instance label image with a ground truth one.

    Parameters
    ----------
    pred_labels, true_labels
        2D integer label images of the same shape (0 is background, each nucleus one value).
    iou_threshold
        IoU above which a predicted nucleus detects a true one (0.5 makes matches unique).
    pred_classes, true_classes
        Optional ``{label value: class}`` of the predicted and true nuclei, for per-class detection F1 (a match counts
        for class k when both nuclei are of class k).

    Returns
    -------
    A dict with ``n_true``, ``n_pred``, ``tp``, ``fp``, ``fn``, detection ``precision``, ``recall`` and ``f1``,
    pixel-level foreground ``dice``, ``aji`` (aggregated Jaccard index, Kumar et al. 2017), and ``pq``
    (panoptic quality) with its factors ``dq`` (detection quality) and ``sq`` (mean IoU of the matches); with
    classes, ``per_class_f1`` (``{class: F1}``).
    """
    pred = np.asarray(pred_labels)
    true = np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"Label images differ in shape: predicted {pred.shape}, true {true.shape}.")
    if pred.ndim != 2:
        raise ValueError("Label images must be 2D.")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(true.dtype, np.integer)):
        raise TypeError("Label images must be integer arrays (one value per nucleus, 0 for background).")
    (true, true_values), (pred, pred_values) = _relabel(true), _relabel(pred)
    area_t, area_p, ti, pi, inter = _overlaps(true, pred)
    n_true, n_pred = len(area_t), len(area_p)
    union = area_t[ti] + area_p[pi] - inter
    iou = inter / np.maximum(union, 1)

    match = iou > iou_threshold
    tp = int(match.sum())
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    sq = float(iou[match].mean()) if tp else 0.0
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 1.0

    fg_t, fg_p = true > 0, pred > 0
    denom = fg_t.sum() + fg_p.sum()
    dice = float(2 * (fg_t & fg_p).sum() / denom) if denom else 1.0

    # AJI: each true nucleus takes its best-IoU predicted nucleus; unused predictions add to the union
    c_sum, u_sum = 0.0, 0.0
    used = np.zeros(n_pred, dtype=bool)
    order = np.lexsort((-iou, ti))  # per true nucleus, best IoU first
    first = np.ones(len(order), dtype=bool)
    first[1:] = ti[order][1:] != ti[order][:-1]
    best = order[first]
    has_match = np.zeros(n_true, dtype=bool)
    has_match[ti[best]] = True
    c_sum += inter[best].sum()
    u_sum += union[best].sum()
    used[pi[best]] = True
    u_sum += area_t[~has_match].sum()
    u_sum += area_p[~used].sum()
    aji = float(c_sum / u_sum) if u_sum else 1.0
    result = {
        "n_true": n_true,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "dice": dice,
        "aji": aji,
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
    }
    if pred_classes is not None and true_classes is not None:
        pc = np.array([pred_classes.get(int(v)) for v in pred_values[1:]], dtype=object)
        tc = np.array([true_classes.get(int(v)) for v in true_values[1:]], dtype=object)
        mt, mp = ti[match], pi[match]
        per_class = {}
        for k in sorted({c for c in tc if c is not None} | {c for c in pc if c is not None}, key=str):
            tp_k = int(((tc[mt] == k) & (pc[mp] == k)).sum())
            fp_k = int((pc == k).sum()) - tp_k
            fn_k = int((tc == k).sum()) - tp_k
            per_class[k] = 2 * tp_k / (2 * tp_k + fp_k + fn_k) if (tp_k + fp_k + fn_k) else float("nan")
        result["per_class_f1"] = per_class
    return result
