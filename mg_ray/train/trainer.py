"""Driver side of one training run: the `TorchTrainer` Ray's documentation describes.

`fit()` is called by `mg-ray train` and by every trial of a study (`mg_ray.tune.trial`). It builds
Ray's own `TorchTrainer` around the per-worker loop (`mg_ray.train.loop`), with the callbacks that
log the run into MLflow from the Train controller (`mg_ray.train.outbox`) plus the caller's (a
study's trial adds Ray's `TuneReportCallback`), and runs it. A Train run with the same `name`
under `storage_path` is resumed from its latest checkpoint (Ray Train V2 does that by name).

The MLflow run (`run_id`) belongs to the caller, which creates it before and ends it after:
`fit()` neither opens nor closes it, it hands the id to the Train controller's callback.
`train()` is `fit()` with a run of its own (what `mg-ray train` does); a study's driver owns
its trials' runs (`mg_ray.tune.trial_state`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from mg_ray import ray_env, tracking
from mg_ray.config import flatten, to_dict
from mg_ray.data import DatasetIndex
from mg_ray.tracking.models import log_run_model
from mg_ray.tracking.tags import STORAGE_PATH, TRAIN_RUN
from mg_ray.train.config import ExperimentConfig
from mg_ray.train.loop import SharedIndex, train_loop_per_worker
from mg_ray.train.outbox import MLflowLoggingCallback


@dataclass
class TrainOutcome:
    metrics: dict[str, Any]  # the last reported metrics
    checkpoint_path: str | None  # the best checkpoint's folder
    run_id: str | None = None  # the MLflow run, when `train()` owned it


def build_trainer(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage_path: str | Path,
    tracking_uri: str,
    run_id: str,
    callbacks: Sequence[Any] = (),
    index: SharedIndex | None = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    checkpoint_config: Any = None,
) -> TorchTrainer:
    """Ray's `TorchTrainer` for `cfg` as Train run `name`, logging into MLflow run `run_id`.
    `index`: the dataset's index in the object store (None: each worker loads it). `train_loop`
    and `checkpoint_config` (default: keep the best by val_top1, and the latest) are for tests."""
    resources = cfg.resources
    return TorchTrainer(
        train_loop,
        # the config travels as the dataclass: the loop takes it as it is
        train_loop_config={"experiment": cfg, "tracking_uri": tracking_uri, "index": index},
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker}
            | ({"GPU": resources.gpus_per_worker} if resources.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=checkpoint_config
            or ray.train.CheckpointConfig(
                num_to_keep=1,  # the best by val_top1; Ray always keeps the latest as well
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            # MLflow first: an epoch is in the run before Tune (and ASHA) hears of it.
            callbacks=[MLflowLoggingCallback(tracking_uri, run_id), *callbacks],
        ),
    )


def fit(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage_path: str | Path,
    tracking_uri: str,
    run_id: str,
    callbacks: Sequence[Any] = (),
    index: SharedIndex | None = None,
) -> TrainOutcome:
    """Train `cfg` on the connected Ray cluster as Train run `name`, logging into MLflow run
    `run_id` (its owner opened it). `index`: the dataset's index, shared (None: each worker loads
    it). Raises what Ray Train raises when training fails."""
    ray_env.apply_defaults(ray_env.TRAIN_RUN)
    trainer = build_trainer(
        cfg,
        name=name,
        storage_path=storage_path,
        tracking_uri=tracking_uri,
        run_id=run_id,
        callbacks=callbacks,
        index=index,
    )
    result = trainer.fit()
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    if result.filesystem.type_name == "local":  # (on a cloud storage_path, nothing is removed)
        kept = [c.path for c, _ in result.best_checkpoints]
        kept += [result.checkpoint.path] if result.checkpoint else []
        for folder in unregistered_checkpoints(result.path, kept):
            shutil.rmtree(folder)
            print(
                f"removed checkpoint {folder}: written, but never recorded by Ray Train "
                "(the run was killed in between); Ray Train would never use or remove it"
            )
    return TrainOutcome(
        metrics=dict(result.metrics or {}), checkpoint_path=best.path if best else None
    )


def unregistered_checkpoints(run_folder: str | Path, kept: Sequence[str | Path]) -> list[Path]:
    """The checkpoint folders of the finished Train run in `run_folder` that Ray Train does not
    hold (`kept`: the run's `Result.best_checkpoints` and `Result.checkpoint`).

    Ray Train deletes the checkpoints it registered beyond `num_to_keep` itself. A folder it does
    not hold was uploaded by a worker's `report` and never registered by the controller: the
    driver was killed in between. A restored run resumes from the checkpoint the controller
    registered last, so such a folder is never used, and never removed, by Ray Train. Folders
    are named `checkpoint_<time>` in the run's folder (Ray Train's layout on a storage_path)."""
    held = {Path(path).resolve() for path in kept}
    return sorted(
        folder
        for folder in Path(run_folder).glob("checkpoint_*")
        if folder.is_dir() and folder.resolve() not in held
    )


def train(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage_path: str | Path,
    tags: dict[str, str] | None = None,
    index: DatasetIndex | None = None,
) -> TrainOutcome:
    """`fit()` into an MLflow run of its own, keyed by the Train run's name: created (or found
    again, when the Train run resumes) before training, ended FINISHED / FAILED / KILLED
    however training ends. `index`: the dataset's index as the caller loaded and checked it, put
    in the object store for the workers (Ray must be initialised; None: each worker loads it)."""
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = tracking.client(tracking_uri)
    run_id, resumed = tracking.start_or_resume_run(
        client,
        tracking.get_or_create_experiment(client, cfg.tracking.experiment),
        name,
        run_name=cfg.tracking.run_name or name,
        tags={TRAIN_RUN: name, STORAGE_PATH: str(storage_path), **(tags or {})},
        params=flatten(to_dict(cfg)),
    )
    if not resumed:
        tracking.log_training_data(client, run_id, cfg.data)
    shared = SharedIndex.put(cfg.data, index) if index is not None else None
    status = "FAILED"
    try:
        with tracking.system_metrics(
            tracking_uri,
            run_id,
            enabled=cfg.tracking.system_metrics,
            interval_s=cfg.tracking.system_metrics_interval_s,
        ):
            outcome = fit(
                cfg,
                name=name,
                storage_path=storage_path,
                tracking_uri=tracking_uri,
                run_id=run_id,
                index=shared,
            )
        log_run_model(client, run_id, tracking_uri)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.terminate_run(client, run_id, status)
    outcome.run_id = run_id
    return outcome


def train_run_exists(storage_path: str | Path, name: str) -> bool:
    """True when a Train run called `name` already has state under `storage_path`."""
    return (Path(storage_path).expanduser() / name).exists()
