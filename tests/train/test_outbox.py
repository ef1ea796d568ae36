"""Rank 0's artifacts reach MLflow through the checkpoint: staged by `ArtifactOutbox`, handed over
with `move_into`, logged by `MLflowLoggingCallback` (a public Ray Train `UserCallback`) into a real
sqlite store, in the run it is handed; nothing once the run's owner has ended it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ray.train import Checkpoint

from mg_ray import tracking
from mg_ray.tracking.reports import RunLogger
from mg_ray.train.outbox import (
    OUTBOX_DIR,
    REPORTED_AGAIN,
    ArtifactOutbox,
    MLflowLoggingCallback,
)
from tests.e2e.helpers import artifact_paths


def test_staged_artifacts_and_metrics_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(
        client, tracking.get_or_create_experiment(client, "t"), "k"
    )
    callback = MLflowLoggingCallback(uri, tracking.require_run(client, "t", "k").info.run_id)

    outbox = ArtifactOutbox()
    outbox.log_text("a: 1\n", "config/resolved_config.yaml")
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    outbox.log_file(model, "best_model")
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    outbox.log_classification_report(
        "val", labels, probs, {"rgb": probs, "pose": probs}, ["left", "right"], ["c0", "c1", "c2"]
    )
    first = tmp_path / "checkpoint_0"
    first.mkdir()
    outbox.move_into(first)
    callback.after_report(
        None, [{"epoch": 0, "val_top1": 0.5}, {"epoch": 0}], Checkpoint.from_directory(first)
    )

    # The next epoch hands over only what was staged since; a report without a checkpoint logs
    # nothing.
    outbox.log_text("b: 2\n", "config/model_spec.yaml")
    second = tmp_path / "checkpoint_1"
    second.mkdir()
    outbox.move_into(second)
    assert sorted(p.name for p in (second / OUTBOX_DIR).rglob("*") if p.is_file()) == [
        "model_spec.yaml"
    ]
    callback.after_report(None, [{"epoch": 1, "val_top1": 0.75}], Checkpoint.from_directory(second))
    callback.after_report(None, [{"epoch": 1, "val_top1": 0.75}], None)
    outbox.close()

    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_top1")] == [
        (0, 0.5),
        (1, 0.75),
    ]
    files = artifact_paths(client, run_id)
    assert {
        "config/resolved_config.yaml",
        "config/model_spec.yaml",
        "best_model/model.pt",
        "evaluation/val_confusion_matrix.png",
        "evaluation/val_per_class_accuracy.csv",
        "evaluation/val_predictions.npz",
        "evaluation/val_predictions.csv",
    } <= files
    csv = client.download_artifacts(run_id, "evaluation/val_predictions.csv", str(tmp_path / "dl"))
    assert "right" in Path(csv).read_text()  # class names survive the hand-over


def test_a_run_its_owner_ended_gets_nothing_more_and_a_missing_run_is_named(tmp_path):
    import pickle

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(
        client, tracking.get_or_create_experiment(client, "t"), "k"
    )
    callback = pickle.loads(pickle.dumps(MLflowLoggingCallback(uri, run_id)))  # as Ray ships it
    callback.after_report(None, [{"epoch": 0, "val_top1": 0.5}], _empty_checkpoint(tmp_path))
    tracking.terminate_run(client, run_id, "KILLED")  # Tune stopped the trial, say
    callback.after_report(None, [{"epoch": 1, "val_top1": 0.75}], _empty_checkpoint(tmp_path))
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [0]
    assert pickle.loads(pickle.dumps(callback)).run_logger is None  # an open client does not travel

    with pytest.raises(LookupError, match="no run with mg_ray.run_key='other'"):
        tracking.require_run(client, "t", "other")  # what a trial's function does, once


def _empty_checkpoint(tmp_path):
    folder = tmp_path / "empty_checkpoint"
    folder.mkdir(exist_ok=True)
    return Checkpoint.from_directory(folder)


def test_the_final_report_again_logs_what_the_run_lacks_and_nothing_twice(tmp_path):
    """A run resumed past its last epoch reports its final metrics and checkpoint again
    (`loop.report_again`): the driver died while the first report was being logged, here
    after its metrics and before its test predictions. Those are logged now; the metrics are not
    logged a second time."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(
        client, tracking.get_or_create_experiment(client, "t"), "k"
    )
    outbox = ArtifactOutbox()
    labels = np.array([0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    outbox.log_classification_report("test", labels, probs, {"rgb": probs}, ["a", "b"], ["x", "y"])
    final = tmp_path / "checkpoint_final"
    final.mkdir()
    outbox.move_into(final)
    outbox.close()
    metrics = {"epoch": 1, "val_top1": 0.75, "test_top1": 1.0, "epochs_completed": 2}
    # the first report got this far: its metrics (one batch), not its artifacts
    RunLogger(uri, run_id).log_metrics(metrics, step=1)

    callback = MLflowLoggingCallback(uri, run_id)
    again = {**metrics, REPORTED_AGAIN: 1}
    callback.after_report(None, [again], Checkpoint.from_directory(final))

    assert "evaluation/test_predictions.npz" in artifact_paths(client, run_id)
    assert [m.step for m in client.get_metric_history(run_id, "test_top1")] == [1]
    assert [m.step for m in client.get_metric_history(run_id, "epochs_completed")] == [1]
    assert REPORTED_AGAIN not in client.get_run(run_id).data.metrics


def test_a_resume_reports_again_what_a_kill_kept_from_mlflow(tmp_path):
    """Killed between epoch 1's report and its logging: the run has epoch 0 only. The resumed
    run reports the restored checkpoint of epoch 1 again (`loop.report_again`): its metrics (one
    unchanged since epoch 0 among them) and its artifacts are logged. Reported again after a
    second resume, nothing is logged twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(
        client, tracking.get_or_create_experiment(client, "t"), "k"
    )
    callback = MLflowLoggingCallback(uri, run_id)
    first = {"epoch": 0, "val_top1": 0.5, "best_val_top1": 0.5}
    callback.after_report(None, [first], _empty_checkpoint(tmp_path))

    before = ArtifactOutbox()  # epoch 1: reported, never logged
    before.log_text("a: 1\n", "config/resolved_config.yaml")
    lost = tmp_path / "checkpoint_1"
    lost.mkdir()
    before.move_into(lost)
    before.close()

    again = {"epoch": 1, "val_top1": np.float32(0.75), "best_val_top1": 0.5, REPORTED_AGAIN: 1}
    for _resume in range(2):
        callback.after_report(None, [again], Checkpoint.from_directory(lost))

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert history("val_top1") == [(0, 0.5), (1, 0.75)]
    assert history("best_val_top1") == [(0, 0.5), (1, 0.5)]
    assert "config/resolved_config.yaml" in artifact_paths(client, run_id)
    assert REPORTED_AGAIN not in client.get_run(run_id).data.metrics
