import numpy as np

from mg_ray.metrics import (
    classification_metrics,
    confusion_matrix,
    mean_class_accuracy,
    topk_accuracy,
)


def test_topk_and_mean_class_accuracy_against_hand_counts():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 1, 1])
    assert topk_accuracy(probs, labels, 1) == 0.5  # samples 0 and 3
    assert topk_accuracy(probs, labels, 2) == 1.0
    cm = confusion_matrix(probs.argmax(1), labels, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    # class 0: 1/1, class 1: 1/3, class 2 absent (ignored)
    assert np.isclose(mean_class_accuracy(cm), (1 + 1 / 3) / 2)


def test_classification_metrics_keys():
    probs = np.eye(3)[[0, 1, 2, 0]]
    out = classification_metrics(
        {"rgb": probs, "pose": probs[::-1]}, probs, np.array([0, 1, 2, 0]), "val"
    )
    assert out["val_top1"] == 1.0 and out["val_top1_rgb"] == 1.0 and out["val_top1_pose"] == 0.5
    assert set(out) == {
        "val_top1",
        "val_top5",
        "val_mean_class_acc",
        "val_top1_rgb",
        "val_top1_pose",
    }
