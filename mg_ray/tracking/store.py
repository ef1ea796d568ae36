"""The MLflow store a process talks to: its URI, a client on it, the experiment, UI links.

Everything goes through `MlflowClient` with an explicit tracking URI: no fluent global state in
Ray's processes. `use_store` sets MLflow's global URIs only where MLflow itself resolves a
`models:/` URI (loading and registering models).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request

import mlflow
from mlflow.tracking import MlflowClient

from mg_ray import paths

# MLflow 3's UI opens an experiment in its GenAI (traces) view unless the experiment says it is a
# model-training one; links carry the view too, for experiments made elsewhere (docs/stack.md).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
UI_VIEW = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address


def resolve_tracking_uri(configured: str | None) -> str:
    """`MLFLOW_TRACKING_URI` wins (as in MLflow itself), then the config, then the sqlite store
    under $MG_RAY_HOME (never the current directory, which is temporary under `ray job submit`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or paths.mlflow_tracking_uri()


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def use_store(tracking_uri: str) -> None:
    """Point MLflow's global tracking and registry URIs at `tracking_uri`: MLflow resolves
    `models:/` URIs (load, register) with them, whatever client is at hand."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)


def check_store(tracking_uri: str) -> None:
    """Fail fast, before any training, when the tracking store cannot be used: a sqlite file (or
    its artifact folder) that cannot be written, or a tracking server that does not answer."""
    db = paths.sqlite_file(tracking_uri)
    if db is not None:
        paths.ensure_writable_file(db, f"MLflow store {tracking_uri}")
        paths.ensure_writable(paths.mlflow_artifact_root(), "MLflow artifact root")
    else:
        check_tracking_server(tracking_uri)


def check_tracking_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking server cannot be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
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


def get_or_create_experiment(mlflow_client: MlflowClient, name: str) -> str:
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
            mlflow_client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
            )
        return experiment.experiment_id
    artifact_location = None
    if mlflow_client.tracking_uri.startswith("sqlite:"):
        artifact_location = paths.mlflow_artifact_root().as_uri()
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )
    except Exception:  # noqa: BLE001 (created concurrently by another process: any store's error)
        return mlflow_client.get_experiment_by_name(name).experiment_id


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of `tracking_uri` is: the tracking server itself, or for a local store
    the address `mlflow ui` serves it on by default."""
    return tracking_uri if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def ui_link(
    base_url: str, experiment_id: str, run_id: str | None = None, view: str | None = None
) -> str:
    """The MLflow UI page of an experiment (or of one run) in the model-training view; `view`: a
    shared runs-table view of the experiment (`share_runs_view`) to open it with."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    if view:  # the runs tab itself: the experiment's page redirects there without the view
        return f"{base_url.rstrip('/')}/#/{page}/runs?{UI_VIEW}&{SHARED_VIEW_PARAM}={view}"
    return f"{base_url.rstrip('/')}/#/{page}?{UI_VIEW}"


# The MLflow UI's shared runs-table views: an experiment tag holding the view's state (JSON:
# filter, sort, columns), opened by the link's `viewStateShareKey`. The UI's own Share button
# writes the same tag; this is how a view is made without clicking.
SHARED_VIEW_TAG, SHARED_VIEW_PARAM = "mlflow.sharedViewState.", "viewStateShareKey"


def share_runs_view(
    mlflow_client: MlflowClient,
    experiment_id: str,
    *,
    search_filter: str,
    order_by: str,
    ascending: bool,
    columns: list[str],
) -> str:
    """Save a runs-table view of the experiment (the runs `search_filter` finds, sorted by
    `order_by`, showing `columns`, each a column key such as "metrics.`best_val_top1`" or
    "params.`optim.lr`"); returns its key for `ui_link`. The same view gets the same key."""
    state = {
        "searchFilter": search_filter,
        "orderByKey": order_by,
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
    }
    value = json.dumps(state, separators=(",", ":"))
    key = hashlib.sha256(value.encode()).hexdigest()[:32]
    mlflow_client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, value)
    return key


def column(kind: str, name: str) -> str:
    """The UI's key of a runs-table column: kind is metrics, params, tags or attributes."""
    return f"{kind}.`{name}`"
