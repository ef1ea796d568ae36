"""Rank 0's artifacts reach MLflow through the checkpoint: staged by `ArtifactOutbox`, handed over
with `move_into`, logged by `MLflowLoggingCallback` into a real sqlite store, which the controller
opens in the background as it starts (`OpenMLflowEarly`)."""

from __future__ import annotations

import numpy as np
import pytest
from ray.train import Checkpoint

from mg_ray.train import tracking
from mg_ray.train.outbox import OUTBOX_DIR, ArtifactOutbox, MLflowLoggingCallback, OpenMLflowEarly, open_run_logger
from tests.e2e.helpers import artifact_paths


def test_staged_artifacts_and_metrics_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(client, tracking.get_or_create_experiment(client, "t"), "k")
    callback = MLflowLoggingCallback(uri, run_id)

    outbox = ArtifactOutbox()
    outbox.log_text("a: 1\n", "config/resolved_config.yaml")
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    outbox.log_file(model, "best_model")
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    outbox.log_classification_report("val", labels, probs, {"rgb": probs, "pose": probs}, ["left", "right"],
                                      ["c0", "c1", "c2"])
    first = tmp_path / "checkpoint_0"
    first.mkdir()
    outbox.move_into(first)
    callback.after_report(None, [{"epoch": 0, "val_top1": 0.5}, {"epoch": 0}], Checkpoint.from_directory(first))

    # The next epoch hands over only what was staged since; a report without a checkpoint (the
    # loop's replay of its final metrics after a resume) logs nothing.
    outbox.log_text("b: 2\n", "config/model_spec.yaml")
    second = tmp_path / "checkpoint_1"
    second.mkdir()
    outbox.move_into(second)
    assert sorted(p.name for p in (second / OUTBOX_DIR).rglob("*") if p.is_file()) == ["model_spec.yaml"]
    callback.after_report(None, [{"epoch": 1, "val_top1": 0.75}], Checkpoint.from_directory(second))
    callback.after_report(None, [{"epoch": 1, "val_top1": 0.75}], None)
    outbox.close()

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_top1")] == [(0, 0.5), (1, 0.75)]
    files = artifact_paths(client, run_id)
    assert {"config/resolved_config.yaml", "config/model_spec.yaml", "best_model/model.pt",
            "evaluation/val_confusion_matrix.png", "evaluation/val_per_class_accuracy.csv",
            "evaluation/val_predictions.npz", "evaluation/val_predictions.csv"} <= files
    csv = client.download_artifacts(run_id, "evaluation/val_predictions.csv", str(tmp_path / "dl"))
    assert "right" in open(csv).read()  # class names survive the hand-over


def test_the_controller_opens_mlflow_once_in_the_background(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(client, tracking.get_or_create_experiment(client, "t"), "k")

    OpenMLflowEarly(uri, run_id).after_controller_start(None)  # what the Train controller calls first
    opening = open_run_logger(uri, run_id)
    assert open_run_logger(uri, run_id) is opening  # once per process
    logger = opening.result(timeout=60)
    assert logger.run_id == run_id
    MLflowLoggingCallback(uri, run_id).after_report(None, [{"epoch": 0, "val_top1": 0.5}], _empty_checkpoint(tmp_path))
    assert client.get_run(run_id).data.metrics["val_top1"] == 0.5

    # A run that is not in the store: the report that needs the logger raises what opening
    # raised, and the next attempt opens again.
    missing = open_run_logger(uri, "0" * 32)
    with pytest.raises(Exception, match="0" * 32):
        MLflowLoggingCallback(uri, "0" * 32).after_report(None, [{"epoch": 0}], _empty_checkpoint(tmp_path))
    assert open_run_logger(uri, "0" * 32) is not missing


def _empty_checkpoint(tmp_path):
    folder = tmp_path / "empty_checkpoint"
    folder.mkdir(exist_ok=True)
    return Checkpoint.from_directory(folder)
