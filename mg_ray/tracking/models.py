"""Models in MLflow: a training run's best model as a pyfunc, as the run's logged model, and
the URIs that name models.

The run's `best_model/model.pt` is wrapped as a pyfunc model from code (`mg_ray.serving`;
signature: a table of clips in, a table of classes out; a one-clip input example)
and logged as the run's MLflow 3 logged model when the run ends (`log_run_model`). Registering a
version from it is `mg_ray.registry`'s job.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from mg_ray.data.layouts import get_layout
from mg_ray.data.video_io import write_video
from mg_ray.model_file import MODEL_FILE, safe_load
from mg_ray.serving.pyfunc import CODE_FILE
from mg_ray.tracking import store


def save_pyfunc(model_file: Path, out: Path) -> None:
    """Write an MLflow pyfunc model folder for `model_file`: a classifier of clips (signature:
    a table of clips in, a table of classes out, `mg_ray.serving.clips`), with a param
    `num_clips` and a one-clip input example."""
    content = safe_load(model_file)
    data = content["data"]
    signature = ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.binary, "video", required=False),
                ColSpec(DataType.binary, "skeleton", required=False),
                ColSpec(DataType.string, "video_path", required=False),
                ColSpec(DataType.string, "skeleton_path", required=False),
                ColSpec(DataType.string, "clip", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(DataType.long, "label"),
                ColSpec(DataType.string, "class_name"),
                ColSpec(Array(DataType.long), "top5"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("num_clips", DataType.long, int(data.get("test_clips", 1)))]),
    )
    with tempfile.TemporaryDirectory() as folder:
        mlflow.pyfunc.save_model(
            str(out),
            python_model=str(CODE_FILE),  # models-from-code: the artifacts are data only
            artifacts={"model_file": str(model_file)},
            signature=signature,
            input_example=example_clip(Path(folder), data),
            # explicit requirements: inference would load the model in a subprocess (slow)
            pip_requirements=[
                f"torch>={torch.__version__.split('+')[0]}",
                "numpy",
                "mlflow",
                "mg-ray",
            ],
            metadata={"class_names": list(content["class_names"])},
        )


def example_clip(folder: Path, data: dict) -> pd.DataFrame:
    """A request of one clip for the model's input example: an 8-frame grey video and a
    still skeleton of the model's layout, as the bytes a client sends."""
    frames, size = 8, 64
    video = folder / "example.mp4"
    write_video(video, np.full((frames, size, size, 3), 128, np.uint8))
    joints = get_layout(data["layout"]).num_joints
    skeleton = {
        "keypoint": np.full((1, frames, joints, 2), size / 2).tolist(),
        "keypoint_score": np.ones((1, frames, joints)).tolist(),
        "img_shape": [size, size],
    }
    return pd.DataFrame(
        {
            "video": [video.read_bytes()],
            "skeleton": [json.dumps(skeleton).encode()],
            "clip": ["example"],
        }
    )


MODEL_TYPE = "mg-ray"  # the type of a training run's MLflow logged model (named after its run)


def run_logged_model(client: MlflowClient, run_id: str):
    """The logged model of training run `run_id` (its best model), or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=10
    )
    ready = [m for m in found if m.model_type == MODEL_TYPE and str(m.status).endswith("READY")]
    return ready[0] if ready else None


def log_best_model(client: MlflowClient, run_id: str, tracking_uri: str) -> str:
    """Make training run `run_id`'s best model (its `best_model/model.pt` artifact) an MLflow 3
    logged model of the run: a pyfunc from code with signature and input example, at the best
    epoch's step, with the epoch's validation metrics linked to it. Returns its model id; a run
    that has one already keeps it."""
    existing = run_logged_model(client, run_id)
    if existing is not None:
        return existing.model_id
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/best_model/{MODEL_FILE}",
            dst_path=folder,
            tracking_uri=tracking_uri,
        )
        metrics = safe_load(local).get("metrics", {})
        step = int(metrics.get("epoch", 0))
        model = client.create_logged_model(
            run.info.experiment_id,
            name=logged_model_name(run.info.run_name),
            source_run_id=run_id,
            model_type=MODEL_TYPE,
            params={"preset": run.data.params.get("model.preset", "")},
        )
        try:
            model_dir = Path(folder) / "model"
            save_pyfunc(Path(local), model_dir)
            client.log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    history = {
        key: client.get_metric_history(run_id, key)
        for key in run.data.metrics
        if key.startswith("val_")
    }
    for key, points in history.items():  # the best epoch's validation metrics, linked to the model
        at_best = [m for m in points if m.step == step]
        if at_best:
            client.log_metric(run_id, key, at_best[-1].value, step=step, model_id=model.model_id)
    return model.model_id


def logged_model_name(run_name: str | None) -> str:
    """A run's logged model is named after the run (`quick-fused_1c6f6c54`: its stage and trial),
    less the characters MLflow refuses in a model name (`/ : . % " '`)."""
    return re.sub(r"[/:.%\"']", "-", run_name or "") or "model"


def log_run_model(client: MlflowClient, run_id: str, tracking_uri: str) -> None:
    """When a training run ends: its best model as its logged model (`log_best_model`). A run that
    saved none (stopped before its first validation) has none, and a failure is a warning: the
    study goes on, and promotion logs the model again if it must."""
    if not any(
        f.path == f"best_model/{MODEL_FILE}" for f in client.list_artifacts(run_id, "best_model")
    ):
        return
    try:
        log_best_model(client, run_id, tracking_uri)
    except (MlflowException, OSError, ValueError) as err:
        print(
            f"warning: run {run_id}: its best model could not be logged as an MLflow model ({err})"
        )


class ModelNotFoundError(LookupError):
    """A model URI (or run id) names nothing in the tracking store."""


def check_model_uri(uri: str, tracking_uri: str) -> None:
    """Raise ModelNotFoundError, naming what is missing and what exists, unless `uri`
    (`models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/<logged model id>`,
    `runs:/<run id>/<path>` or a local folder) resolves to a model. Cheap: run it before loading anything."""
    mlflow_client = store.client(tracking_uri)
    where = f"in the tracking store {tracking_uri}"
    if uri.startswith("models:/m-") and "/" not in uri[len("models:/") :] and "@" not in uri:
        try:
            mlflow_client.get_logged_model(uri[len("models:/") :])
        except MlflowException:
            raise ModelNotFoundError(f"{uri}: no logged model with that id {where}") from None
    elif uri.startswith("models:/"):
        name, sep, ref = uri[len("models:/") :].partition("@")
        version = None
        if not sep:
            name, _, version = name.partition("/")
        try:
            model = mlflow_client.get_registered_model(name)
        except MlflowException:
            known = sorted(m.name for m in mlflow_client.search_registered_models(max_results=50))
            raise ModelNotFoundError(
                f"{uri}: no registered model {name!r} {where} "
                f"(registered: {', '.join(known) or 'none'})"
            ) from None
        if sep and ref not in (model.aliases or {}):
            raise ModelNotFoundError(
                f"{uri}: model {name!r} has no alias {ref!r} "
                f"(aliases: {', '.join(sorted(model.aliases or {})) or 'none'})"
            )
        if version:
            try:
                mlflow_client.get_model_version(name, version)
            except MlflowException:
                raise ModelNotFoundError(
                    f"{uri}: model {name!r} has no version {version!r}"
                ) from None
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        check_run(mlflow_client, run_id, tracking_uri)
        if path and not mlflow_client.list_artifacts(run_id, path.rstrip("/")):
            raise ModelNotFoundError(f"{uri}: run {run_id} has no artifact {path!r}")
    elif not Path(uri).expanduser().exists():
        raise ModelNotFoundError(f"{uri}: not a models:/ or runs:/ URI, and no such folder")


def check_run(client: MlflowClient, run_id: str, tracking_uri: str) -> None:
    """Raise ModelNotFoundError unless run `run_id` exists in the store."""
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(
            f"run {run_id!r}: no such MLflow run in the tracking store {tracking_uri}"
        ) from None


def resolve_model_file(location: str, tracking_uri: str | None = None) -> Path:
    """A local path to a model file from a path or an MLflow `runs:/<run_id>[/artifact]` URI
    (a run's own: its `best_model/model.pt`)."""
    if location.startswith("runs:/"):
        uri = (
            location
            if location.rstrip("/").count("/") > 1
            else f"{location.rstrip('/')}/best_model/{MODEL_FILE}"
        )
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
        )
        return local / MODEL_FILE if local.is_dir() else local
    return Path(location).expanduser()


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """(pyfunc model, the `MicroGestureClassifier` it wraps) for `model_uri`, checked first:
    a store that cannot be used or a URI that names nothing is a one-line error."""
    uri = store.resolve_tracking_uri(tracking_uri)
    store.check_store(uri)
    check_model_uri(model_uri, uri)
    store.use_store(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    return model, model.unwrap_python_model()
