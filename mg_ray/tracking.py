"""MLflow access for the whole project: the store, runs found by key, their lifecycle, logging.

Who does what:
- The *driver* that owns a run creates or reopens it (found again by its key, a tag) and
  terminates it: `mg-ray train` for its one run, the study driver for the study's run and every
  trial's run (`mg_ray.tune.trial_state`). No run is left RUNNING whatever happens to workers.
- The *Train controller* logs metrics and artifacts into a run it finds by key (`RunLogger`),
  from rank 0's reports and the files staged in their checkpoints (`mg_ray.train.outbox`).
  Workers never talk to MLflow.

Everything goes through `MlflowClient` with an explicit tracking URI: no fluent global state in
Ray's processes.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from mg_ray import paths

RUN_KEY_TAG = "mg_ray.run_key"
PARENT_TAG = "mlflow.parentRunId"
# The tags a study puts on its runs (`mg_ray.tune`): which study, which role (study / trial), the
# Tune trial id, how the trial ended (completed / stopped / failed / interrupted / orphaned) and
# why, and the epochs Tune saw.
STUDY_TAG, ROLE_TAG, TRIAL_TAG = "mg_ray.study", "mg_ray.role", "mg_ray.trial_id"
STATE_TAG, STOP_REASON_TAG, EPOCHS_TAG = "mg_ray.trial_state", "mg_ray.stop_reason", "mg_ray.trial_epochs"


def resolve_tracking_uri(configured: str | None) -> str:
    """`MLFLOW_TRACKING_URI` wins (as in MLflow itself), then the config, then the sqlite store
    under $MG_RAY_HOME (never the current directory, which is temporary under `ray job submit`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or paths.mlflow_tracking_uri()


def check_store(tracking_uri: str) -> None:
    """Fail fast, before any training, when the tracking store cannot be used: a sqlite file (or
    its artifact folder) that cannot be written, or a tracking server that does not answer."""
    db = paths.sqlite_file(tracking_uri)
    if db is not None:
        paths.ensure_writable_file(db, f"MLflow store {tracking_uri}")
        paths.ensure_writable(paths.mlflow_artifact_root(), "MLflow artifact root")
    else:
        check_tracking_server(tracking_uri)


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_tracking_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking server cannot be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):  # basic-auth is on: the server is up
            return
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise ConnectionError(
        f"MLflow tracking server {tracking_uri} cannot be reached ({problem}). Start it "
        f"(infra/local/start.sh), fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite store."
    )


# MLflow 3's UI opens an experiment in its GenAI (traces) view unless the experiment says it is a
# model-training one (shared/STACK.md); links carry the view too, for experiments made elsewhere.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
UI_VIEW = "workflowType=machine_learning"


def get_or_create_experiment(mlflow_client, name: str) -> str:
    """The id of experiment `name`, created if missing (artifacts under $MG_RAY_HOME for a sqlite
    store) and tagged as a model-training experiment."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                f"or choose another tracking.experiment"
            )
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    artifact_location = None
    if mlflow_client.tracking_uri.startswith("sqlite:"):
        artifact_location = paths.mlflow_artifact_root().as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location,
                                               tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    except Exception:  # noqa: BLE001 (created concurrently by another process: any store's error)
        return mlflow_client.get_experiment_by_name(name).experiment_id


def ui_link(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or of one run) in the model-training view."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/#/{page}?{UI_VIEW}"


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run this process creates: the entry point, and the git commit of
    the working folder, or `MG_RAY_GIT_COMMIT` where there is no git checkout (a `ray job submit`
    upload carries no .git: set it when submitting)."""
    import sys

    if entry_point is None:
        argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        entry_point = " ".join(["mg-ray", *sys.argv[1:2]]) if argv0.name in ("mg-ray", "cli.py", "-m") \
            else (argv0.as_posix() if not argv0.is_absolute() else argv0.name)
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str | None, *, enabled: bool = True, interval_s: float = 10.0):
    """Log MLflow's system metrics of this node into `run_id` while the block runs (its public
    `SystemMetricsMonitor`; needs psutil, and pynvml for GPUs). A no-op when disabled or without
    a run."""
    if not enabled or run_id is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit the code runs from (MG_RAY_GIT_COMMIT wins: a `ray job submit` upload has no .git)."""
    import subprocess

    if os.environ.get("MG_RAY_GIT_COMMIT"):
        return os.environ["MG_RAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_training_data(mlflow_client, run_id: str, data_cfg) -> None:
    """The dataset a training run reads (a `DataConfig`) as its dataset inputs: training,
    validation and test splits."""
    from mg_ray.registry import dataset_fingerprint

    log_dataset(mlflow_client, run_id, data_cfg.root, dataset_fingerprint(data_cfg.root),
                {"training": data_cfg.train_split, "validation": data_cfg.val_split, "test": data_cfg.test_split})


def log_dataset(mlflow_client, run_id: str, root: str | Path, fingerprint: str | None,
                splits: Mapping[str, str | None]) -> None:
    """The dataset as the run's MLflow dataset inputs, one per split it uses: name (the folder's),
    digest (the dataset fingerprint), source (the folder) and context (`splits`: context -> split,
    e.g. {"train": "train", "validation": "val"})."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    root = Path(root)
    digest = (fingerprint or "unknown")[:36]
    inputs = [
        DatasetInput(Dataset(name=f"{root.name}:{split}", digest=digest, source_type="local",
                             source=json.dumps({"uri": str(root)})),
                     tags=[InputTag(key="mlflow.data.context", value=context)])
        for context, split in splits.items() if split
    ]
    if inputs:
        mlflow_client.log_inputs(run_id, datasets=inputs)


def find_run(mlflow_client, experiment_id: str, run_key: str):
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=2
    )
    if len(runs) > 1:
        raise RuntimeError(f"two MLflow runs carry {RUN_KEY_TAG}={run_key!r}; expected one")
    return runs[0] if runs else None


def start_or_resume_run(
    mlflow_client,
    experiment_id: str,
    run_key: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
) -> tuple[str, bool]:
    """Return (run_id, resumed). A run found by `run_key` is reopened (status RUNNING again)."""
    run = find_run(mlflow_client, experiment_id, run_key)
    if run is not None:
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    all_tags = {RUN_KEY_TAG: run_key, **source_tags(), **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    if params:
        log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id, False


def log_params(mlflow_client, run_id: str, params: Mapping[str, object]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def terminate_run(mlflow_client, run_id: str, status: str) -> None:
    """status: FINISHED, FAILED or KILLED. Idempotent."""
    mlflow_client.set_terminated(run_id, status=status)


class RunLogger:
    """A handle on one run: metrics per epoch and artifacts (the controller's, the ensemble's, a study's)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = client(tracking_uri)
        self.run_id = run_id

    def is_running(self) -> bool:
        """False once the run's owner has ended it."""
        return self.client.get_run(self.run_id).info.status == "RUNNING"

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

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
        from mg_ray.train.metrics import confusion_matrix, per_class_accuracy

        cm = confusion_matrix(fused.argmax(1), labels, len(class_names))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            plot_confusion_matrix(cm, class_names, tmp / f"{split}_confusion_matrix.png",
                                  title=f"{split}: fused prediction")
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


def open_run_logger(tracking_uri: str, experiment: str, run_key: str) -> RunLogger:
    """A `RunLogger` on the run of `experiment` whose key is `run_key` (its owner created it)."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    run = find_run(mlflow_client, found.experiment_id, run_key) if found is not None else None
    if run is None:
        raise LookupError(f"MLflow experiment {experiment!r} at {tracking_uri} has no run with "
                          f"{RUN_KEY_TAG}={run_key!r}: its driver creates it before training starts")
    load_pyplot()  # confusion matrices are drawn here, in the controller
    return RunLogger(tracking_uri, run.info.run_id)


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
        writer.writerow([name, int(label), class_names[label], pred, class_names[pred], f"{probs[pred]:.4f}"])
    return out.getvalue()


def load_pyplot():
    """matplotlib's pyplot on the Agg backend (no display): 0.5-0.7 s the first time in a process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
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
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if normalised[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
