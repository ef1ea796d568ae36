"""What a run shows besides its metrics: per-epoch metrics in batches, classification reports
(confusion matrix, per-class accuracy, predictions) and plots.

`RunLogger` is a handle on one run. The Train controller holds one for a trial's run
(`mg_ray.train.outbox`); the ensemble and a study's summary use it for their own runs.
"""

from __future__ import annotations

import csv
import io
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from mlflow.entities import Metric

from mg_ray.metrics import confusion_matrix, per_class_accuracy
from mg_ray.tracking.store import client


class RunLogger:
    """A handle on one run: metrics per epoch and artifacts (the controller's, the ensemble's, a study's)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = client(tracking_uri)
        self.run_id = run_id

    def is_running(self) -> bool:
        """False once the run's owner has ended it."""
        return self.client.get_run(self.run_id).info.status == "RUNNING"

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v)
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_classification_report(
        self,
        split: str,
        labels: np.ndarray,
        fused: np.ndarray,
        stream_probs: Mapping[str, np.ndarray],
        class_names: Sequence[str],
        clip_names: Sequence[str],
    ) -> None:
        """Confusion matrix PNG, per-class accuracy CSV and the predictions of one split."""
        cm = confusion_matrix(fused.argmax(1), labels, len(class_names))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            plot_confusion_matrix(
                cm,
                class_names,
                tmp / f"{split}_confusion_matrix.png",
                title=f"{split}: fused prediction",
            )
            (tmp / f"{split}_per_class_accuracy.csv").write_text(
                per_class_csv(cm, per_class_accuracy(cm), class_names)
            )
            np.savez_compressed(
                tmp / f"{split}_predictions.npz",
                labels=labels,
                fused=fused,
                clip_names=np.asarray(clip_names),
                **{f"probs_{s}": p for s, p in stream_probs.items()},
            )
            (tmp / f"{split}_predictions.csv").write_text(
                predictions_csv(labels, fused, clip_names, class_names)
            )
            self.client.log_artifacts(self.run_id, str(tmp), "evaluation")


def per_class_csv(cm: np.ndarray, accuracy: np.ndarray, class_names: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["class_id", "class_name", "support", "correct", "accuracy"])
    for k, name in enumerate(class_names):
        acc = "" if np.isnan(accuracy[k]) else f"{accuracy[k]:.4f}"
        writer.writerow([k, name, int(cm[k].sum()), int(cm[k, k]), acc])
    return out.getvalue()


def predictions_csv(
    labels: np.ndarray, fused: np.ndarray, clip_names: Iterable[str], class_names: Sequence[str]
) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["clip", "label", "label_name", "predicted", "predicted_name", "confidence"])
    for name, label, probs in zip(clip_names, labels, fused):
        pred = int(probs.argmax())
        writer.writerow(
            [name, int(label), class_names[label], pred, class_names[pred], f"{probs[pred]:.4f}"]
        )
    return out.getvalue()


def load_pyplot():
    """matplotlib's pyplot on the Agg backend (no display). Imported here, not at the top: it is
    heavy, and only the processes that draw need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> None:
    plt = load_pyplot()
    k = len(class_names)
    size = max(5.0, 0.35 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if normalised[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
