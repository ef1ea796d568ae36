"""MLflow runs: found again by key, opened and ended by their owner, with source, dataset and
lineage, and the rule for a run's score.

Who does what:
- The *driver* that owns a run creates or reopens it (`start_or_resume_run`, found again by its
  key) and ends it (`terminate_run`): `mg-ray train` for its one run, the study driver for the
  study's run and every trial's run (`mg_ray.tune.trial_state`). No run is left RUNNING whatever
  happens to workers.
- A trial's function finds its run once (`require_run`) and hands the run id on to the Train
  controller, which logs metrics and artifacts into it (`mg_ray.train.outbox`). Workers never
  talk to MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from mg_ray.config import ConfigError
from mg_ray.data.video_io import dataset_fingerprint
from mg_ray.tracking.tags import DEFINITION, INIT_RUN, PARENT, RUN_KEY


class DefinitionChanged(ConfigError):
    """A study or pipeline name is reused with another definition (space file)."""


def find_run(mlflow_client: MlflowClient, experiment_id: str, run_key: str):
    """The run of `experiment_id` whose key is `run_key`, or None."""
    runs = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY}` = '{run_key}'", max_results=2
    )
    if len(runs) > 1:
        raise RuntimeError(f"two MLflow runs carry {RUN_KEY}={run_key!r}; expected one")
    return runs[0] if runs else None


def require_run(mlflow_client: MlflowClient, experiment: str, run_key: str):
    """The run of experiment `experiment` (a name) whose key is `run_key`; LookupError naming
    both when there is none (its owner creates it before training starts)."""
    found = mlflow_client.get_experiment_by_name(experiment)
    run = find_run(mlflow_client, found.experiment_id, run_key) if found is not None else None
    if run is None:
        raise LookupError(
            f"MLflow experiment {experiment!r} at {mlflow_client.tracking_uri} has no run with "
            f"{RUN_KEY}={run_key!r}: its owner creates it before training starts"
        )
    return run


def _check_definition(run, fingerprint: str | None, what: str) -> None:
    """Refuse to reuse `what` (e.g. "study 'quick'"), whose existing run is `run`, with a
    definition other than the one it was started with (`fingerprint`; None: nothing to check)."""
    if fingerprint is not None and run.data.tags.get(DEFINITION) != fingerprint:
        raise DefinitionChanged(
            f"{what} already exists (MLflow run {run.info.run_id}) with a different definition; "
            f"resume it with the same space file, or choose another --study name"
        )


def finished_run(
    mlflow_client: MlflowClient, experiment_id: str, run_key: str, fingerprint: str, what: str
):
    """The run found by `run_key` when it ended FINISHED, else None. A found run started with
    another definition (`fingerprint`) is refused first, with `DefinitionChanged` naming `what`,
    as `start_or_resume_run` refuses it."""
    run = find_run(mlflow_client, experiment_id, run_key)
    if run is None:
        return None
    _check_definition(run, fingerprint, what)
    return run if run.info.status == "FINISHED" else None


def start_or_resume_run(
    mlflow_client: MlflowClient,
    experiment_id: str,
    run_key: str,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
    what: str | None = None,
) -> tuple[str, bool]:
    """Return (run_id, resumed). A run found by `run_key` is reopened (status RUNNING again).

    When `tags` carry a definition fingerprint (`DEFINITION`: a study's space, a pipeline's
    file), a found run started with another one is refused first, with `DefinitionChanged`
    naming `what` (default: the key), and nothing is changed."""
    tags = dict(tags or {})
    run = find_run(mlflow_client, experiment_id, run_key)
    if run is not None:
        _check_definition(run, tags.get(DEFINITION), what or f"run {run_key!r}")
        mlflow_client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    all_tags = {RUN_KEY: run_key, **source_tags(), **tags}
    if parent_run_id:
        all_tags[PARENT] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    if params:
        log_params(mlflow_client, run.info.run_id, params)
    return run.info.run_id, False


def log_params(mlflow_client: MlflowClient, run_id: str, params: Mapping[str, object]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def terminate_run(mlflow_client: MlflowClient, run_id: str, status: str) -> None:
    """status: FINISHED, FAILED or KILLED. Idempotent."""
    mlflow_client.set_terminated(run_id, status=status)


def score_name(metric: str) -> str:
    """The run metric that scores a training run on `metric`: the loop reports a running best of
    val_top1 (`best_val_top1`, the epoch whose model the run keeps); other metrics as reported."""
    return f"best_{metric}" if metric == "val_top1" else metric


def run_score(run, metric: str) -> float | None:
    """A training run's score on `metric` (`score_name`), or None when it has none yet."""
    return run.data.metrics.get(score_name(metric))


def lineage(rgb_init: str | None, pose_init: str | None) -> dict[str, str]:
    """The runs a fused model's streams were initialised from (their `runs:/<id>` locations), as
    tags: {"mg_ray.init.rgb_run": <run id>, ...}; a local file leaves no tag."""
    out = {}
    for stream, location in (("rgb", rgb_init), ("pose", pose_init)):
        if location and str(location).startswith("runs:/"):
            out[INIT_RUN.format(stream=stream)] = str(location)[len("runs:/") :].split("/")[0]
    return out


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """MLflow's source tags for a run this process creates: the entry point, and the git commit of
    the working folder, or `MG_RAY_GIT_COMMIT` where there is no git checkout (a `ray job submit`
    upload carries no .git: set it when submitting)."""
    if entry_point is None:
        argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
        entry_point = (
            " ".join(["mg-ray", *sys.argv[1:2]])
            if argv0.name in ("mg-ray", "cli.py", "-m")
            else (argv0.as_posix() if not argv0.is_absolute() else argv0.name)
        )
    source = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit != "unknown":
        source["mlflow.source.git.commit"] = commit
    return source


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit the code runs from (MG_RAY_GIT_COMMIT wins: a `ray job submit` upload has no .git)."""
    if os.environ.get("MG_RAY_GIT_COMMIT"):
        return os.environ["MG_RAY_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def system_metrics(
    tracking_uri: str, run_id: str | None, *, enabled: bool = True, interval_s: float = 10.0
):
    """Log MLflow's system metrics of this node into `run_id` while the block runs (its public
    `SystemMetricsMonitor`; needs psutil, and pynvml for GPUs). A no-op when disabled or without
    a run."""
    if not enabled or run_id is None:
        yield
        return
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_training_data(
    mlflow_client: MlflowClient, run_id: str, data_cfg, fingerprint: str | None = None
) -> None:
    """The dataset a training run reads (a `DataConfig`) as its dataset inputs: training,
    validation and test splits. `fingerprint`: the dataset's, when the caller has it (else it is
    computed here: `dataset_fingerprint`)."""
    log_dataset(
        mlflow_client,
        run_id,
        data_cfg.root,
        fingerprint if fingerprint is not None else dataset_fingerprint(data_cfg.root),
        {
            "training": data_cfg.train_split,
            "validation": data_cfg.val_split,
            "test": data_cfg.test_split,
        },
    )


def log_dataset(
    mlflow_client: MlflowClient,
    run_id: str,
    root: str | Path,
    fingerprint: str | None,
    splits: Mapping[str, str | None],
) -> None:
    """The dataset as the run's MLflow dataset inputs, one per split it uses: name (the folder's),
    digest (the dataset fingerprint), source (the folder) and context (`splits`: context -> split,
    e.g. {"train": "train", "validation": "val"})."""
    root = Path(root)
    digest = (fingerprint or "unknown")[:36]
    inputs = [
        DatasetInput(
            Dataset(
                name=f"{root.name}:{split}",
                digest=digest,
                source_type="local",
                source=json.dumps({"uri": str(root)}),
            ),
            tags=[InputTag(key="mlflow.data.context", value=context)],
        )
        for context, split in splits.items()
        if split
    ]
    for attempt in range(3):
        try:
            if inputs:
                mlflow_client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            # Runs that log the same dataset at once (two trials starting together) race to
            # insert its one row in the store, and the loser gets the unique constraint's error;
            # tried again, it finds the row the other wrote and links it to this run.
            text = str(err).lower()
            if attempt == 2 or ("unique" not in text and "duplicate" not in text):
                raise
            time.sleep(0.2 * (attempt + 1))
