"""How a training run's metrics and artifacts reach MLflow: rank 0 -> checkpoint -> controller.

Rank 0 does not talk to MLflow. It stages what it would log in an `ArtifactOutbox` and hands
the staged files over inside the checkpoint it reports every epoch; its metrics travel in the
report itself. `MLflowLoggingCallback`, a Ray Train `UserCallback` that runs in the Train
controller, logs both into the run. Workers thus never import mlflow or matplotlib, and a
worker group restarted by `FailureConfig` logs on into the same run.

Ordering: Ray Train runs callbacks in order, and `fit()` puts this one before Tune's report
callback, so a trial's epoch is in MLflow before Tune (or ASHA) sees it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray.train import UserCallback

OUTBOX_DIR = "mlflow_outbox"  # inside a reported checkpoint folder
# A metric the loop adds to the restored epoch's report when it reports it again after a resume
# (`loop.report_again`, `MLflowLoggingCallback`); it is not logged.
REPORTED_AGAIN = "reported_again"
ARTIFACTS, REPORTS = "artifacts", "reports"


class ArtifactOutbox:
    """Rank 0's stand-in for `tracking.reports.RunLogger`: the same logging calls, staged on disk.

    Files wait in a private folder until `move_into(checkpoint_folder)` hands them over with the
    next report. Classification reports are staged as their arrays and rendered by the
    controller (`RunLogger.log_classification_report`), so workers never import matplotlib.
    """

    def __init__(self) -> None:
        self._staging = Path(tempfile.mkdtemp(prefix="mg-ray-outbox-"))

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._staging / ARTIFACTS / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        folder = self._staging / ARTIFACTS / (artifact_path or "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, folder / Path(path).name)

    def log_classification_report(
        self,
        split: str,
        labels: np.ndarray,
        fused: np.ndarray,
        stream_probs: Mapping[str, np.ndarray],
        class_names: Sequence[str],
        clip_names: Sequence[str],
    ) -> None:
        folder = self._staging / REPORTS
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / f"{split}.npz",
            labels=labels,
            fused=fused,
            class_names=np.asarray(class_names),
            clip_names=np.asarray(clip_names),
            **{f"probs_{s}": p for s, p in stream_probs.items()},
        )

    def move_into(self, checkpoint_folder: str | Path) -> None:
        """Hand everything staged so far to the checkpoint about to be reported."""
        target = Path(checkpoint_folder) / OUTBOX_DIR
        shutil.move(str(self._staging), target)
        self._staging.mkdir()

    def close(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def replay(outbox: Path, logger) -> None:
    """Log a checkpoint's staged files into the run of `logger` (a `tracking.reports.RunLogger`):
    its artifacts and its classification reports (logging them twice writes the same paths)."""
    if (outbox / ARTIFACTS).is_dir():  # one call, the staged folder tree as the artifact tree
        logger.client.log_artifacts(logger.run_id, str(outbox / ARTIFACTS))
    for report in sorted((outbox / REPORTS).glob("*.npz")) if (outbox / REPORTS).is_dir() else ():
        with np.load(report) as arrays:
            probs = {k[len("probs_") :]: arrays[k] for k in arrays.files if k.startswith("probs_")}
            logger.log_classification_report(
                report.stem,
                arrays["labels"],
                arrays["fused"],
                probs,
                arrays["class_names"].tolist(),
                arrays["clip_names"].tolist(),
            )


# Reported values that are wall-clock timestamps, not measurements: Tune's results carry them
# (`benchmarks/bench_trial_overhead.py` reads them), MLflow's metrics do not.
TIMESTAMPS = frozenset({"training_started_at"})


def as_metrics(reported: dict[str, Any]) -> dict[str, Any]:
    """A report's values that are MLflow metrics (timestamps left out)."""
    return {k: v for k, v in reported.items() if k not in TIMESTAMPS}


class MLflowLoggingCallback(UserCallback):
    """Logs rank 0's reported metrics (step = epoch) and the outbox of its checkpoint into MLflow
    run `run_id`, from the Train controller (a public `ray.train.UserCallback`).

    Created by the driver with the id of the run its owner opened, it runs in the controller and
    opens MLflow at the first report (the import and the store, while the workers train on). A
    report without a checkpoint is skipped (the loop makes none). A resumed run reports its
    restored epoch's metrics and checkpoint again, marked `REPORTED_AGAIN`: a kill may have come
    between that report and its logging, so its artifacts are logged again (the same paths) and
    its metrics if the run lacks that epoch. Once the run's owner has ended it (a trial that Tune stopped, say,
    whose workers train on until Tune's stop reaches them), nothing more is logged into it.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.run_logger = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "run_logger": None}  # an open MLflow client does not travel

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        if self.run_logger is None:
            # Imported here: mlflow and matplotlib are heavy, and only the controller needs them.
            from mg_ray.tracking.reports import RunLogger, load_pyplot

            load_pyplot()  # confusion matrices are drawn here, in the controller
            self.run_logger = RunLogger(self.tracking_uri, self.run_id)
        if not self.run_logger.is_running():
            return
        reported = {k: v for k, v in metrics[0].items() if k != REPORTED_AGAIN}  # rank 0's
        step = int(reported.get("epoch", 0))
        if not (metrics[0].get(REPORTED_AGAIN) and self.has_epoch(step)):
            self.run_logger.log_metrics(as_metrics(reported), step=step)
        with checkpoint.as_directory() as folder:
            outbox = Path(folder) / OUTBOX_DIR
            if outbox.is_dir():
                replay(outbox, self.run_logger)

    def has_epoch(self, epoch: int) -> bool:
        """Whether the run has `epoch`'s metrics (an epoch's report is logged in one batch)."""
        history = self.run_logger.client.get_metric_history(self.run_id, "epoch")
        return any(m.step == epoch for m in history)
