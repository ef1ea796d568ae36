"""The MLflow model registry: a training run's best model -> a pyfunc model -> a registered version.

Used by a study's promotion of its best trial and by `mg-ray promote` (`mg_ray.tune.promote`).

The run's `best_model/model.pt` is wrapped as a pyfunc model from code (`mg_ray.serving`; signature:
`rgb` and `pose` float32 tensors in, fused class probabilities out; an input example), logged as the
run's MLflow 3 logged model (`log_best_model`, when the run ends) and registered from it. Tags on the version: its lineage (study, trial, run, git commit, the runs a fused
model was initialised from), the data it was scored on (dataset fingerprint and root, validation
split), its validation score and its multi-clip test top-1 (reported, never used to decide).

The new version gets the alias `candidate`. It takes `champion` when it beats the current
champion on the same data (`champion_decision`): when both were scored on the same dataset and
split, by their scores; otherwise the current champion is first evaluated on the candidate's
validation split, and the candidate must beat that. The decision and its numbers are a tag of
the version (`champion_decision`).

The run's own status is never touched (the model is saved locally and uploaded as artifacts), so a
trial that ASHA stopped keeps its KILLED status.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray import tracking
from mg_ray.train.checkpoint import MODEL_FILE, safe_load

CANDIDATE, CHAMPION = "candidate", "champion"


def save_pyfunc(model_file: Path, out: Path) -> None:
    """Write an MLflow pyfunc model folder for `model_file` (with signature and input example)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from mg_ray.serving.pyfunc import CODE_FILE

    content = safe_load(model_file)
    kwargs, data = content["spec"]["kwargs"], content["data"]
    num_classes = content["spec"]["num_classes"]
    rgb_shape = (-1, 3, kwargs["rgb_frames"], data["rgb_size"], data["rgb_size"])
    pose_shape = (-1, kwargs["pose_channels"], kwargs["pose_frames"], data["heatmap_size"], data["heatmap_size"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), rgb_shape, "rgb"),
                       TensorSpec(np.dtype(np.float32), pose_shape, "pose")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "probabilities")]),
    )
    example = {"rgb": np.zeros((1, *rgb_shape[1:]), np.float32),
               "pose": np.zeros((1, *pose_shape[1:]), np.float32)}
    import torch

    mlflow.pyfunc.save_model(
        str(out),
        python_model=str(CODE_FILE),  # models-from-code: the artifacts are data (mg_ray.serving.pyfunc)
        artifacts={"model_file": str(model_file)},
        signature=signature,
        input_example=example,
        # explicit requirements: inference would load the model in a subprocess (slow)
        pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "mlflow", "mg-ray"],
        metadata={"class_names": list(content["class_names"])},
    )


LOGGED_MODEL = "model"  # the name of a training run's MLflow logged model


def run_logged_model(client, run_id: str):
    """The logged model of training run `run_id` (its best model), or None."""
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        max_results=10)
    ready = [m for m in found if m.name == LOGGED_MODEL and str(m.status).endswith("READY")]
    return ready[0] if ready else None


def log_best_model(client, run_id: str, tracking_uri: str) -> str:
    """Make training run `run_id`'s best model (its `best_model/model.pt` artifact) an MLflow 3
    logged model of the run: a pyfunc from code with signature and input example, at the best
    epoch's step, with the epoch's validation metrics linked to it. Returns its model id; a run
    that has one already keeps it."""
    import mlflow.artifacts
    from mlflow.entities import LoggedModelOutput

    existing = run_logged_model(client, run_id)
    if existing is not None:
        return existing.model_id
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/best_model/{MODEL_FILE}", dst_path=folder, tracking_uri=tracking_uri
        )
        metrics = safe_load(local).get("metrics", {})
        step = int(metrics.get("epoch", 0))
        model = client.create_logged_model(run.info.experiment_id, name=LOGGED_MODEL, source_run_id=run_id,
                                           model_type="mg-ray", params={"preset": run.data.params.get("model.preset", "")})
        try:
            model_dir = Path(folder) / "model"
            save_pyfunc(Path(local), model_dir)
            client.log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    history = {key: client.get_metric_history(run_id, key) for key in run.data.metrics if key.startswith("val_")}
    for key, points in history.items():  # the best epoch's validation metrics, linked to the model
        at_best = [m for m in points if m.step == step]
        if at_best:
            client.log_metric(run_id, key, at_best[-1].value, step=step, model_id=model.model_id)
    return model.model_id


def log_run_model(client, run_id: str, tracking_uri: str) -> None:
    """When a training run ends: its best model as its logged model (`log_best_model`). A run that
    saved none (stopped before its first validation) has none, and a failure is a warning: the
    study goes on, and promotion logs the model again if it must."""
    from mlflow.exceptions import MlflowException

    if not any(f.path == f"best_model/{MODEL_FILE}" for f in client.list_artifacts(run_id, "best_model")):
        return
    try:
        log_best_model(client, run_id, tracking_uri)
    except (MlflowException, OSError, ValueError) as err:
        print(f"warning: run {run_id}: its best model could not be logged as an MLflow model ({err})")


def promote_run(
    run_id: str,
    name: str,
    *,
    tracking_uri: str | None = None,
    metric: str = "val_top1",
    mode: str = "max",
    lineage: dict[str, str] | None = None,
    force_champion: bool = False,
) -> dict[str, Any]:
    """Register `run_id`'s best model as a new version of `name`; returns what happened."""
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(tracking_uri)
    check_run(client, run_id, tracking_uri)
    run = client.get_run(run_id)
    score_key = f"best_{metric}" if f"best_{metric}" in run.data.metrics else metric
    if score_key not in run.data.metrics:
        raise ValueError(f"run {run_id} has no metric {metric!r} to compare on; is it a training run?")
    score = run.data.metrics[score_key]
    existing = registered_version(client, name, run_id)
    if existing is not None:
        # Promoting a run twice (a finished study run again, a repeated `mg-ray promote`) must not
        # register a duplicate version: the existing one keeps its aliases, and only the champion
        # rule below applies to it.
        return _apply_champion_rule(client, name, existing, score, metric, mode, force_champion, new=False,
                                    tracking_uri=tracking_uri)
    model_id = log_best_model(client, run_id, tracking_uri)  # usually logged when the run ended
    params = run.data.params
    tags = {
        "run_id": run_id,
        "study": run.data.tags.get(tracking.STUDY_TAG, ""),
        "trial": run.data.tags.get(tracking.TRIAL_TAG, ""),
        "git_commit": tracking.git_commit(),
        "dataset_fingerprint": dataset_fingerprint(params.get("data.root")),
        "dataset_root": params.get("data.root", ""),
        "val_split": params.get("data.val_split", ""),
        metric: str(score),
        **({"test_top1": str(run.data.metrics["test_top1"])} if "test_top1" in run.data.metrics else {}),
        **{k: str(v) for k, v in (lineage or {}).items()},
    }
    # the version is made from the run's logged model: both point at each other in MLflow
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # MLflow resolves a models:/ source with the global store
    mlflow.set_registry_uri(tracking_uri)
    version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags,
                                          model_id=model_id)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return _apply_champion_rule(client, name, client.get_model_version(name, version.version), score, metric,
                                mode, force_champion, new=True, tracking_uri=tracking_uri)


class ModelNotFoundError(LookupError):
    """A model URI (or run id) names nothing in the tracking store."""


def check_model_uri(uri: str, tracking_uri: str) -> None:
    """Raise ModelNotFoundError, naming what is missing and what exists, unless `uri`
    (`models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/<logged model id>`,
    `runs:/<run id>/<path>` or a local
    folder) resolves to a model. Cheap: run it before loading anything."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(tracking_uri)
    where = f"in the tracking store {tracking_uri}"
    if uri.startswith("models:/m-") and "/" not in uri[len("models:/"):] and "@" not in uri:
        try:
            client.get_logged_model(uri[len("models:/"):])
        except MlflowException:
            raise ModelNotFoundError(f"{uri}: no logged model with that id {where}") from None
    elif uri.startswith("models:/"):
        name, sep, ref = uri[len("models:/"):].partition("@")
        version = None
        if not sep:
            name, _, version = name.partition("/")
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            known = sorted(m.name for m in client.search_registered_models(max_results=50))
            raise ModelNotFoundError(f"{uri}: no registered model {name!r} {where} "
                                     f"(registered: {', '.join(known) or 'none'})") from None
        if sep and ref not in (model.aliases or {}):
            raise ModelNotFoundError(f"{uri}: model {name!r} has no alias {ref!r} "
                                     f"(aliases: {', '.join(sorted(model.aliases or {})) or 'none'})")
        if version:
            try:
                client.get_model_version(name, version)
            except MlflowException:
                raise ModelNotFoundError(f"{uri}: model {name!r} has no version {version!r}") from None
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        check_run(client, run_id, tracking_uri)
        if path and not client.list_artifacts(run_id, path.rstrip("/")):
            raise ModelNotFoundError(f"{uri}: run {run_id} has no artifact {path!r}")
    elif not Path(uri).expanduser().exists():
        raise ModelNotFoundError(f"{uri}: not a models:/ or runs:/ URI, and no such folder")


def check_run(client, run_id: str, tracking_uri: str) -> None:
    """Raise ModelNotFoundError unless run `run_id` exists in the store."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"run {run_id!r}: no such MLflow run in the tracking store {tracking_uri}") from None


def registered_version(client, name: str, run_id: str):
    """The oldest version of registered model `name` made from `run_id`, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def same_data(a: dict[str, str], b: dict[str, str]) -> bool:
    """Two versions' tags say they were scored on the same dataset (fingerprint) and split."""
    return (a.get("dataset_fingerprint", "unknown") != "unknown"
            and a.get("dataset_fingerprint") == b.get("dataset_fingerprint")
            and a.get("val_split") == b.get("val_split"))


def champion_decision(champion_tags: dict[str, str], candidate_tags: dict[str, str], candidate_score: float,
                      metric: str, mode: str, evaluate_champion) -> tuple[bool, str]:
    """Whether the candidate beats the champion on the candidate's data, and why.

    Scored on the same data: the champion's recorded score. Otherwise `evaluate_champion()` scores
    it on the candidate's validation split now (it raises ValueError when it cannot: then the
    champion stays). Returns (the candidate takes champion, the decision as a sentence)."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    data = (f"dataset {candidate_tags.get('dataset_fingerprint', 'unknown')[:12]}, "
            f"split {candidate_tags.get('val_split') or '?'}")
    if same_data(champion_tags, candidate_tags):
        old = float(champion_tags.get(metric, "nan"))
        takes = not np.isfinite(old) or better(candidate_score, old)
        return takes, f"compared on the same data ({data}): {metric} {candidate_score:.4f} vs champion's {old:.4f}"
    try:
        old = evaluate_champion()
    except ValueError as err:
        return False, f"the champion could not be evaluated on this version's data ({data}: {err}); it stays champion"
    return better(candidate_score, old), (f"champion re-evaluated on this version's validation split ({data}): "
                                          f"{metric} {candidate_score:.4f} vs champion's {old:.4f}")


def evaluate_on_split(model_uri: str, data_root: str, split: str, tracking_uri: str) -> float:
    """Top-1 of a registered model on a dataset split, one clip per video (the protocol of the
    training loop's validation). ValueError when the dataset is not there or does not fit."""
    from mg_ray.data import load_index
    from mg_ray.data.annotations import AnnotationError
    from mg_ray.predict import classify, load_classifier

    if not data_root or not Path(data_root).is_dir():
        raise ValueError(f"dataset folder {data_root or '(none recorded)'} not found")
    try:
        index = load_index(data_root)
        clips = index.split(split)
    except (AnnotationError, KeyError) as err:
        raise ValueError(str(err)) from None
    model, inner = load_classifier(model_uri, tracking_uri)
    if len(inner.class_names) != index.num_classes:
        raise ValueError(f"the model has {len(inner.class_names)} classes, the dataset {index.num_classes}")
    try:
        probs = classify(model, inner, [(index.video_path(a.frame_dir), (a.keypoint, a.keypoint_score, a.img_shape))
                                        for a in clips], num_clips=1)
    except (RuntimeError, ValueError) as err:  # another layout, another input size
        raise ValueError(f"the model cannot take this data ({str(err)[:200]})") from None
    labels = np.array([a.label for a in clips])
    return float((probs.argmax(1) == labels).mean())


def _apply_champion_rule(client, name, version, score, metric, mode, force_champion, *, new: bool,
                         tracking_uri: str):
    """`version` takes `champion` if it beats the current champion on its own data (or there is
    none, or `force_champion`); the decision is tagged on the version; returns what happened."""
    from mlflow.exceptions import MlflowException

    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        previous = None
    if previous is None:
        better, decision = True, "no champion before"
    elif previous.version == version.version:
        better, decision = True, version.tags.get("champion_decision", "already champion")
    elif force_champion:
        better, decision = True, f"forced (--force-champion) over version {previous.version}"
    else:
        better, decision = champion_decision(
            previous.tags, version.tags, score, metric, mode,
            lambda: evaluate_on_split(f"models:/{name}/{previous.version}", version.tags.get("dataset_root", ""),
                                      version.tags.get("val_split", ""), tracking_uri))
    if better:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    if new or previous is None or previous.version != version.version:
        client.set_model_version_tag(name, version.version, "champion_decision", decision)
    return {
        "name": name,
        "version": int(version.version),
        "new": new,
        "score": score,
        "champion": better,
        "decision": decision,
        "previous_champion": int(previous.version) if previous is not None else None,
    }


def existing_version_state(out: dict[str, Any]) -> str:
    """What promoting an already registered run did, for `promote_run`'s result with new=False."""
    if out["champion"]:
        return "nothing new registered, it is champion"
    return f"nothing new registered, champion stays version {out['previous_champion']}"


def dataset_fingerprint(root: str | None) -> str:
    """dataset.json's fingerprint, else a sha256 of the annotation file; 'unknown' without data."""
    if not root:
        return "unknown"
    folder = Path(root).expanduser()
    meta = folder / "dataset.json"
    if meta.is_file():
        import json

        fp = json.loads(meta.read_text()).get("fingerprint")
        if fp:
            return str(fp)
    ann = folder / "annotations.pkl"
    if ann.is_file():
        return hashlib.sha256(ann.read_bytes()).hexdigest()
    return "unknown"
