"""How a training run's metrics and artifacts reach MLflow: rank 0 -> checkpoint -> controller.

Rank 0 does not talk to MLflow. It stages what it would log in an `ArtifactOutbox` and hands
the staged files over inside the checkpoint it reports every epoch; its metrics travel in the
report itself. `MLflowLoggingCallback`, a Ray Train callback that runs in the Train controller,
logs both into the run.

Why: importing mlflow and opening its store costs a fresh worker process about 2 s, and
matplotlib (the confusion matrices) 0.7 s more, all of it on the path from one trial's end to
the next one's first batch while the other rank waits. The controller opens them in a
background thread that `OpenMLflowEarly` starts with the controller, so the first report finds
MLflow open. In a study the controller runs in the trial's driver process, which Tune reuses
(`MgRayTorchTrainer` with `should_abort`): the imports are paid once per driver, not per trial.
See `benchmarks/bench_trial_overhead.py`.

Ordering: Ray Train runs callbacks in order, and `fit()` puts this one before Tune's report
callback, so a trial's epoch is in MLflow before Tune (or ASHA) sees it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback

OUTBOX_DIR = "mlflow_outbox"      # inside a reported checkpoint folder
ARTIFACTS, REPORTS = "artifacts", "reports"


class ArtifactOutbox:
    """Rank 0's stand-in for `tracking.RunLogger`: the same logging calls, staged on disk.

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
        np.savez(folder / f"{split}.npz", labels=labels, fused=fused, class_names=np.asarray(class_names),
                 clip_names=np.asarray(clip_names), **{f"probs_{s}": p for s, p in stream_probs.items()})

    def move_into(self, checkpoint_folder: str | Path) -> None:
        """Hand everything staged so far to the checkpoint about to be reported."""
        target = Path(checkpoint_folder) / OUTBOX_DIR
        shutil.move(str(self._staging), target)
        self._staging.mkdir()

    def close(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def replay(outbox: Path, logger) -> None:
    """Log a checkpoint's staged files into the run of `logger` (a `tracking.RunLogger`)."""
    if (outbox / ARTIFACTS).is_dir():  # one call, the staged folder tree as the artifact tree
        logger.client.log_artifacts(logger.run_id, str(outbox / ARTIFACTS))
    for report in sorted((outbox / REPORTS).glob("*.npz")) if (outbox / REPORTS).is_dir() else ():
        with np.load(report) as arrays:
            probs = {k[len("probs_"):]: arrays[k] for k in arrays.files if k.startswith("probs_")}
            logger.log_classification_report(report.stem, arrays["labels"], arrays["fused"], probs,
                                             arrays["class_names"].tolist(), arrays["clip_names"].tolist())


def mlflow_callbacks(tracking_uri: str, run_id: str) -> list:
    """The Train callbacks that log a run into MLflow from its controller."""
    return [OpenMLflowEarly(tracking_uri, run_id), MLflowLoggingCallback(tracking_uri, run_id)]


_opened: dict[tuple[str, str], Future] = {}  # (tracking URI, run id) -> RunLogger, per process
_opened_lock = threading.Lock()


def open_run_logger(tracking_uri: str, run_id: str) -> Future:
    """The run's `RunLogger`, opened once per process in a background thread: mlflow and
    matplotlib imported, the store opened. The future raises what opening raised; the next call
    after a failure tries again."""
    key = (tracking_uri, run_id)
    with _opened_lock:
        future = _opened.get(key)
        if future is None or (future.done() and future.exception() is not None):
            _opened[key] = future = Future()
            threading.Thread(target=_open, args=(future, *key), name="mlflow-open", daemon=True).start()
        return future


def _open(future: Future, tracking_uri: str, run_id: str) -> None:
    try:
        from mg_ray.train.tracking import RunLogger, load_pyplot

        logger = RunLogger(tracking_uri, run_id)
        logger.client.get_run(run_id)  # connects to the store (and checks the run is there)
        load_pyplot()
        future.set_result(logger)
    except BaseException as err:  # handed to whoever waits for the logger
        future.set_exception(err)


class OpenMLflowEarly(ControllerCallback):
    """Starts opening MLflow (`open_run_logger`) when the Train controller starts."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_controller_start(self, train_run_context) -> None:
        open_run_logger(self.tracking_uri, self.run_id)


class MLflowLoggingCallback(UserCallback):
    """Logs rank 0's reported metrics (step = epoch) and the outbox of its checkpoint.

    Created by the driver, it runs in the Train controller, with the logger that
    `OpenMLflowEarly` started opening (or opens it now). A report without a checkpoint is the
    loop's replay of its final metrics after a resume (already logged): it is skipped.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._logger = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        if self._logger is None:
            self._logger = open_run_logger(self.tracking_uri, self.run_id).result()
        reported = metrics[0]  # rank 0's
        self._logger.log_metrics(reported, step=int(reported.get("epoch", 0)))
        with checkpoint.as_directory() as folder:
            outbox = Path(folder) / OUTBOX_DIR
            if outbox.is_dir():
                replay(outbox, self._logger)
