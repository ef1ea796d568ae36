"""Stable locations for everything a run writes.

`ray job submit --working-dir .` runs the entry point inside a temporary copy of the project, so
relative output paths would be lost with it. Every default output therefore lives under one home
folder: `$MG_RAY_HOME`, or `~/.mg-ray` when unset.

    <home>/datasets/synth      the embedded synthetic dataset
    <home>/mlflow.db           sqlite MLflow tracking + registry store
    <home>/mlartifacts/        MLflow artifact root for that store
    <home>/ray_results/        Ray Train / Tune storage (checkpoints, experiment state)
    <home>/optuna.db           Optuna study storage
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("MG_RAY_HOME", "~/.mg-ray")).expanduser().resolve()


def synthetic_dataset() -> Path:
    return home() / "datasets" / "synth"


def mlflow_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (as in MLflow itself), else the sqlite store in home()."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    return home() / "mlartifacts"


def ray_storage() -> Path:
    return home() / "ray_results"


def optuna_storage_url() -> str:
    return f"sqlite:///{home() / 'optuna.db'}"
