"""Promotion: a training run's best model -> an MLflow pyfunc model -> a registered version.

    mg-ray promote --run <run id> [--name mg-ray-fused]

The run's `best_model/model.pt` is wrapped as a pyfunc model (signature: `rgb` and `pose` float32
tensors in, fused class probabilities out; an input example), logged into the run under `model/`
and registered. The new version gets the alias `candidate`; it takes `champion` only when it
beats the current champion on the validation metric (or there is none), unless forced. Lineage
tags on the version: study, trial, run, git commit, dataset fingerprint.

The run's own status is never touched (the model is saved locally and uploaded as artifacts), so a
trial that ASHA stopped keeps its KILLED status.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray.train import tracking
from mg_ray.train.checkpoint import MODEL_FILE

CANDIDATE, CHAMPION = "candidate", "champion"


class MicroGestureClassifier:
    """The pyfunc model: loads `model.pt` (weights-only) and returns fused class probabilities.

    Input: {"rgb": float32 [N, 3, T, H, W], "pose": float32 [N, C, T', h, w]}
    Output: float32 [N, K] fused probabilities. Several clips of one video: predict them as a
    batch and average the rows (as `mg-ray predict` does).
    """

    # Defined lazily as a PythonModel subclass (mlflow import is heavy); see `_pyfunc_class()`.


def _pyfunc_class():
    import mlflow.pyfunc

    class _MicroGestureClassifier(mlflow.pyfunc.PythonModel):
        __doc__ = MicroGestureClassifier.__doc__

        def load_context(self, context):
            from mg_ray.train.checkpoint import load_model_file

            self.model, content = load_model_file(context.artifacts["model_file"])
            self.class_names = content["class_names"]
            self.data = content["data"]
            self.stream_weights = tuple(content["spec"]["kwargs"].get("stream_weights", (1.0, 1.0)))

        def predict(self, context, model_input, params=None):
            import torch

            from mg_ray.models import fuse_probabilities

            rgb = torch.as_tensor(np.asarray(model_input["rgb"], dtype=np.float32))
            pose = torch.as_tensor(np.asarray(model_input["pose"], dtype=np.float32))
            with torch.no_grad():
                return fuse_probabilities(self.model(rgb, pose), self.stream_weights).numpy()

    return _MicroGestureClassifier


def save_pyfunc(model_file: Path, out: Path) -> None:
    """Write an MLflow pyfunc model folder for `model_file` (with signature and input example)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from mg_ray.train.checkpoint import safe_load

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
        python_model=_pyfunc_class()(),
        artifacts={"model_file": str(model_file)},
        signature=signature,
        input_example=example,
        # explicit requirements: inference would load the model in a subprocess (slow)
        pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "mlflow", "mg-ray"],
        metadata={"class_names": list(content["class_names"])},
    )


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
    import mlflow

    tracking_uri = tracking.resolve_tracking_uri(tracking_uri)
    client = tracking.client(tracking_uri)
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
        return _apply_champion_rule(client, name, existing, score, metric, mode, force_champion, new=False)
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/best_model/{MODEL_FILE}", dst_path=folder, tracking_uri=tracking_uri
        )
        model_dir = Path(folder) / "model"
        save_pyfunc(Path(local), model_dir)
        client.log_artifacts(run_id, str(model_dir), "model")
    tags = {
        "run_id": run_id,
        "study": (lineage or {}).get("study", run.data.tags.get("mg_ray.study", "")),
        "trial": (lineage or {}).get("trial", run.data.tags.get("mg_ray.trial_id", "")),
        "git_commit": git_commit(),
        "dataset_fingerprint": dataset_fingerprint(run.data.params.get("data.root")),
        metric: str(score),
    }
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return _apply_champion_rule(client, name, version, score, metric, mode, force_champion, new=True)


def registered_version(client, name: str, run_id: str):
    """The oldest version of registered model `name` made from `run_id`, or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _apply_champion_rule(client, name, version, score, metric, mode, force_champion, *, new: bool):
    """`version` takes `champion` if it beats the current champion's score (or there is none,
    or `force_champion`); returns what happened."""
    previous = None
    try:
        previous = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion yet
        pass
    if previous is not None and previous.version == version.version:
        better = True  # already the champion
    elif previous is not None and not force_champion:
        old = float(previous.tags.get(metric, "nan"))
        better = not np.isfinite(old) or (score > old if mode == "max" else score < old)
    else:
        better = True
    if better:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "new": new,
        "score": score,
        "champion": better,
        "previous_champion": int(previous.version) if previous is not None else None,
    }


def existing_version_state(out: dict[str, Any]) -> str:
    """What promoting an already registered run did, for `promote_run`'s result with new=False."""
    if out["champion"]:
        return "nothing new registered, it is champion"
    return f"nothing new registered, champion stays version {out['previous_champion']}"


def git_commit() -> str:
    """The commit the code runs from (MG_RAY_GIT_COMMIT wins: a `ray job submit` upload has no .git)."""
    if os.environ.get("MG_RAY_GIT_COMMIT"):
        return os.environ["MG_RAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


# ---- CLI ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id of a training run (or trial)")
    which.add_argument("--study", help="promote the best trial of this study instead")
    parser.add_argument("--experiment", default="mg-ray", help="the study's MLflow experiment")
    parser.add_argument("--name", default="mg-ray-fused", help="registered model name")
    parser.add_argument("--metric", default="val_top1")
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument("--force-champion", action="store_true",
                        help="make this version champion even if it does not beat the current one")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or the local sqlite store")


def best_trial_run(study: str, experiment: str, metric: str, mode: str, tracking_uri: str | None) -> str:
    """The run id of the study's best trial by `best_<metric>`; ties go to the trial that started
    first (the rule the study itself uses)."""
    mlflow_client = tracking.client(tracking.resolve_tracking_uri(tracking_uri))
    found = mlflow_client.get_experiment_by_name(experiment)
    trials = [] if found is None else mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`mg_ray.study` = '{study}' and tags.`mg_ray.role` = 'trial'",
        order_by=[f"metrics.`best_{metric}` {'DESC' if mode == 'max' else 'ASC'}", "attributes.start_time ASC"],
        max_results=1,
    )
    if not trials:
        raise SystemExit(f"error: --study {study!r}: no trials of that study in MLflow experiment {experiment!r}")
    return trials[0].info.run_id


def run(args: argparse.Namespace) -> int:
    if args.study:
        args.run = best_trial_run(args.study, args.experiment, args.metric, args.mode, args.tracking_uri)
    out = promote_run(args.run, args.name, tracking_uri=args.tracking_uri, metric=args.metric,
                      mode=args.mode, force_champion=args.force_champion)
    if out["new"]:
        state = "champion" if out["champion"] else f"candidate (champion stays version {out['previous_champion']})"
        print(f"registered {out['name']} version {out['version']} ({args.metric} {out['score']:.4f}): {state}")
    else:
        print(f"run {args.run} is already registered as {out['name']} version {out['version']} "
              f"({args.metric} {out['score']:.4f}): {existing_version_state(out)}")
    print(f"predict with: mg-ray predict --model models:/{out['name']}@{CHAMPION} CLIP.mp4 --skeleton CLIP.npz")
    return 0
