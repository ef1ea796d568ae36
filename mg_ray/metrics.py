"""Classification metrics over a whole split: arrays in, numbers out (no I/O, no ranks)."""

from __future__ import annotations

import numpy as np


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """probs [N, K], labels [N] -> fraction of samples whose label is among the k best classes."""
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    topk = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall per class from a confusion matrix; NaN for classes absent from the split."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / support, np.nan)


def mean_class_accuracy(cm: np.ndarray) -> float:
    acc = per_class_accuracy(cm)
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")


def classification_metrics(
    stream_probs: dict[str, np.ndarray], fused: np.ndarray, labels: np.ndarray, prefix: str
) -> dict[str, float]:
    """The per-epoch numbers: fused top-1/top-5/mean class accuracy plus each stream's top-1.

    stream_probs: {"rgb": [N, K], "pose": [N, K]} softmax outputs; fused: [N, K].
    """
    num_classes = fused.shape[1]
    cm = confusion_matrix(fused.argmax(1), labels, num_classes)
    out = {
        f"{prefix}_top1": topk_accuracy(fused, labels, 1),
        f"{prefix}_top5": topk_accuracy(fused, labels, 5),
        f"{prefix}_mean_class_acc": mean_class_accuracy(cm),
    }
    for stream, probs in stream_probs.items():
        out[f"{prefix}_top1_{stream}"] = topk_accuracy(probs, labels, 1)
    return out
