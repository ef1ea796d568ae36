"""The MLflow model registry: a training run's logged model -> a registered version, and the
champion rule.

Used by a study's promotion of its best trial and by `mg-ray promote` (`mg_ray.tune.promote`).
A version is made from the run's MLflow 3 logged model (`mg_ray.tracking.models`), so both
point at each other in MLflow. Tags on the version: its lineage (study, trial, run, git commit,
the runs a fused model was initialised from), the data it was scored on (dataset fingerprint and
root, validation split), its validation score and its multi-clip test top-1 (reported, never
used to decide).

The new version gets the alias `candidate`. It takes `champion` when it beats the current
champion on the same data (`champion_decision`): when both were scored on the same dataset and
split, by their scores; otherwise the current champion is first evaluated on the candidate's
validation split (`evaluate_on_split`, through `mg_ray.predict`), and the candidate must beat
that. The decision and its numbers are a tag of the version (`champion_decision`).

The run's own status is never touched, so a trial that ASHA stopped keeps its status.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from mg_ray import tracking
from mg_ray.data import load_index
from mg_ray.data.annotations import AnnotationError
from mg_ray.data.video_io import dataset_fingerprint
from mg_ray.predict import classify, load_classifier
from mg_ray.tracking import tags
from mg_ray.tracking.models import check_run, log_best_model

CANDIDATE, CHAMPION = "candidate", "champion"


def promote_run(
    run_id: str,
    name: str,
    *,
    tracking_uri: str | None = None,
    metric: str = "val_top1",
    mode: str = "max",
    context: dict[str, str] | None = None,
    force_champion: bool = False,
) -> dict[str, Any]:
    """Register `run_id`'s best model as a new version of `name`; returns what happened.
    `context`: more tags for the version (the pipeline and study it came from)."""
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(tracking_uri)
    check_run(client, run_id, tracking_uri)
    run = client.get_run(run_id)
    score = tracking.run_score(run, metric)
    if score is None:
        raise ValueError(
            f"run {run_id} has no metric {tracking.score_name(metric)!r} to compare on; "
            f"is it a training run?"
        )
    existing = registered_version(client, name, run_id)
    if existing is not None:
        # Promoting a run twice (a finished study run again, a repeated `mg-ray promote`) must not
        # register a duplicate version: the existing one keeps its aliases, and only the champion
        # rule below applies to it.
        return _apply_champion_rule(
            client,
            name,
            existing,
            score,
            metric,
            mode,
            force_champion,
            new=False,
            tracking_uri=tracking_uri,
        )
    model_id = log_best_model(client, run_id, tracking_uri)  # usually logged when the run ended
    params = run.data.params
    version_tags = {
        "run_id": run_id,
        "study": run.data.tags.get(tags.STUDY, ""),
        "trial": run.data.tags.get(tags.TRIAL, ""),
        "git_commit": tracking.git_commit(),
        tags.VERSION_DATASET: dataset_fingerprint(params.get("data.root")),
        tags.VERSION_DATASET_ROOT: params.get("data.root", ""),
        tags.VERSION_VAL_SPLIT: params.get("data.val_split", ""),
        metric: str(score),
        **(
            {"test_top1": str(run.data.metrics["test_top1"])}
            if "test_top1" in run.data.metrics
            else {}
        ),
        **tracking.lineage(params.get("model.rgb_init"), params.get("model.pose_init")),
        **{k: str(v) for k, v in (context or {}).items()},
    }
    # the version is made from the run's logged model: both point at each other in MLflow
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    tracking.use_store(tracking_uri)  # MLflow resolves a models:/ source with the global store
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=version_tags, model_id=model_id
    )
    mark_registered(client, model_id, name, version.version)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return _apply_champion_rule(
        client,
        name,
        client.get_model_version(name, version.version),
        score,
        metric,
        mode,
        force_champion,
        new=True,
        tracking_uri=tracking_uri,
    )


def mark_registered(client, model_id: str, name: str, version: str) -> None:
    """Tell the logged model it has a registered version, as `mlflow.register_model` does (which
    cannot be used here: from a `models:/<id>` URI it registers the version without its run)."""
    listed = client.get_logged_model(model_id).tags.get(tags.MODEL_VERSIONS)
    versions = json.loads(listed) if listed else []
    versions.append({"name": name, "version": str(version)})
    client.set_logged_model_tags(model_id, {tags.MODEL_VERSIONS: json.dumps(versions)})


def registered_version(client, name: str, run_id: str):
    """The oldest version of registered model `name` made from `run_id`, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def same_data(a: dict[str, str], b: dict[str, str]) -> bool:
    """Two versions' tags say they were scored on the same dataset (fingerprint) and split."""
    return (
        a.get(tags.VERSION_DATASET, "unknown") != "unknown"
        and a.get(tags.VERSION_DATASET) == b.get(tags.VERSION_DATASET)
        and a.get(tags.VERSION_VAL_SPLIT) == b.get(tags.VERSION_VAL_SPLIT)
    )


def champion_decision(
    champion_tags: dict[str, str],
    candidate_tags: dict[str, str],
    candidate_score: float,
    metric: str,
    mode: str,
    evaluate_champion,
) -> tuple[bool, str]:
    """Whether the candidate beats the champion on the candidate's data, and why.

    Scored on the same data: the champion's recorded score. Otherwise `evaluate_champion()` scores
    it on the candidate's validation split now (it raises ValueError when it cannot: then the
    champion stays). Returns (the candidate takes champion, the decision as a sentence)."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    data = (
        f"dataset {candidate_tags.get(tags.VERSION_DATASET, 'unknown')[:12]}, "
        f"split {candidate_tags.get(tags.VERSION_VAL_SPLIT) or '?'}"
    )
    if same_data(champion_tags, candidate_tags):
        old = float(champion_tags.get(metric, "nan"))
        takes = not np.isfinite(old) or better(candidate_score, old)
        return (
            takes,
            f"compared on the same data ({data}): {metric} {candidate_score:.4f} vs champion's {old:.4f}",
        )
    try:
        old = evaluate_champion()
    except ValueError as err:
        return (
            False,
            f"the champion could not be evaluated on this version's data ({data}: {err}); it stays champion",
        )
    return better(candidate_score, old), (
        f"champion re-evaluated on this version's validation split ({data}): "
        f"{metric} {candidate_score:.4f} vs champion's {old:.4f}"
    )


def evaluate_on_split(model_uri: str, data_root: str, split: str, tracking_uri: str) -> float:
    """Top-1 of a registered model on a dataset split, one clip per video (the protocol of the
    training loop's validation). ValueError when the dataset is not there or does not fit."""
    if not data_root or not Path(data_root).is_dir():
        raise ValueError(f"dataset folder {data_root or '(none recorded)'} not found")
    try:
        index = load_index(data_root)
        clips = index.split(split)
    except (AnnotationError, KeyError) as err:
        raise ValueError(str(err)) from None
    model, inner = load_classifier(model_uri, tracking_uri)
    if len(inner.class_names) != index.num_classes:
        raise ValueError(
            f"the model has {len(inner.class_names)} classes, the dataset {index.num_classes}"
        )
    try:
        probs = classify(
            model,
            inner,
            [
                (index.video_path(a.frame_dir), (a.keypoint, a.keypoint_score, a.img_shape))
                for a in clips
            ],
            num_clips=1,
        )
    except (RuntimeError, ValueError) as err:  # another layout, another input size
        raise ValueError(f"the model cannot take this data ({str(err)[:200]})") from None
    labels = np.array([a.label for a in clips])
    return float((probs.argmax(1) == labels).mean())


def _apply_champion_rule(
    client, name, version, score, metric, mode, force_champion, *, new: bool, tracking_uri: str
):
    """`version` takes `champion` if it beats the current champion on its own data (or there is
    none, or `force_champion`); the decision is tagged on the version; returns what happened."""
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no champion yet
        previous = None
    if previous is None:
        better, decision = True, "no champion before"
    elif previous.version == version.version:
        better, decision = True, version.tags.get(tags.CHAMPION_DECISION, "already champion")
    elif force_champion:
        better, decision = True, f"forced (--force-champion) over version {previous.version}"
    else:
        better, decision = champion_decision(
            previous.tags,
            version.tags,
            score,
            metric,
            mode,
            lambda: evaluate_on_split(
                f"models:/{name}/{previous.version}",
                version.tags.get(tags.VERSION_DATASET_ROOT, ""),
                version.tags.get(tags.VERSION_VAL_SPLIT, ""),
                tracking_uri,
            ),
        )
    if better:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    if new or previous is None or previous.version != version.version:
        client.set_model_version_tag(name, version.version, tags.CHAMPION_DECISION, decision)
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
