"""Driver side of one training run: resource checks, the MLflow run's lifecycle, `TorchTrainer`.

`fit()` is called by `mg-ray train` and by every trial of a Tune study. It owns the MLflow run:
finds it by key or creates it, hands its id to the workers, and terminates it, whether training
finishes, fails or is interrupted. In a study the trial's run is terminated by the study driver
instead, once Tune has recorded how the trial ended (`close_run=False`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mg_ray import paths
from mg_ray.config import flatten, to_dict
from mg_ray.train import tracking
from mg_ray.train.config import ExperimentConfig

# Ray Train V2 settings read where the TorchTrainer is created and propagated to its controller.
# The controller polls its workers every HEALTH_CHECK_INTERVAL (default 2 s): the worker group's
# start, each report and the end of training each wait for a poll, which is seconds of every
# trial of a study. A tenth of that costs nothing measurable on the controller.
# The preemption watcher is one more actor (process) per run, useful only on clusters with spot
# nodes; `init_ray` turns it off on the private local cluster. A user's own setting always wins.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
LOCAL_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class ResourceError(RuntimeError):
    """The cluster cannot run what was asked: raised before anything waits on resources."""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster in `address` / RAY_ADDRESS, or start a local one on loopback.

    Without an address we start a private local cluster (`address="local"`) rather than letting
    `ray.init()` attach to whatever cluster happens to run on this machine. Its dashboard (which
    serves the State API that Ray Train's placement-group cleaner polls) listens on loopback only.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        for key, value in LOCAL_TRAIN_ENV_DEFAULTS.items():  # inherited by the cluster's workers
            os.environ.setdefault(key, value)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True)


def check_resources(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    reserved_cpus: float = 0.0,
    concurrent: int = 1,
    what: str = "training run",
) -> None:
    """Refuse, with the fix, a request the cluster can never satisfy (Ray would wait forever).

    reserved_cpus: CPUs held besides the workers (a Tune trial's driver holds some).
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need = concurrent * (num_workers * cpus_per_worker + reserved_cpus)
    if need > cpus + 1e-9:
        fit_cpus = max(0.0, cpus / concurrent - reserved_cpus) / num_workers
        hint = (
            f"use fewer workers, or --cpus-per-worker {fit_cpus:.2g} (fractional CPUs work)"
            if fit_cpus > 0 else "add CPUs to the cluster"
        )
        raise ResourceError(
            f"{what} needs {need:g} CPUs ({concurrent} x ({num_workers} workers x {cpus_per_worker:g} CPU"
            + (f" + {reserved_cpus:g} for the trial driver" if reserved_cpus else "")
            + f")) but the Ray cluster has {cpus:g}: it would never start. Fix: {hint}."
        )
    if use_gpu and gpus < concurrent * num_workers:
        raise ResourceError(
            f"{what} asks for {concurrent * num_workers} GPU(s) but the Ray cluster has {gpus:g}. "
            f"Fix: set resources.use_gpu=false (--cpu) or connect to a cluster with GPU nodes."
        )


@dataclass
class TrainOutcome:
    run_id: str
    status: str                      # FINISHED / FAILED / KILLED
    metrics: dict[str, Any]          # the last reported metrics
    checkpoint_path: str | None      # the best checkpoint's folder
    storage_path: str


def fit(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage_path: str | Path | None = None,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    callbacks: Sequence[Any] = (),
    close_run: bool = True,
    should_abort: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Train `cfg` on the connected Ray cluster; the Train run is called `name`.

    A Train run with the same `name` under `storage_path` is resumed from its latest checkpoint
    (Ray Train V2 does that by name), and its MLflow run, found by `run_key`, is continued.
    Once `should_abort()` (called every 0.2 s) returns True, the run is aborted: its workers are
    shut down and `TrainRunAborted` is raised.
    """
    import ray.train
    from ray.train.torch import TorchConfig

    from mg_ray.train.loop import train_loop_per_worker
    from mg_ray.train.outbox import mlflow_callbacks
    from mg_ray.train.torch_trainer import MgRayTorchTrainer, TrainRunAborted

    storage = Path(storage_path or paths.ray_storage()).expanduser().resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.check_tracking_server(tracking_uri)
    mlflow_client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(mlflow_client, cfg.tracking.experiment)
    run_id, resumed = tracking.start_or_resume_run(
        mlflow_client,
        experiment_id,
        run_key or name,
        run_name=cfg.tracking.run_name or name,
        parent_run_id=parent_run_id,
        tags={"mg_ray.train_run": name, "mg_ray.storage_path": str(storage), **(tags or {})},
        params=flatten(to_dict(cfg)),
    )
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    resources = cfg.resources
    trainer = MgRayTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1,  # the best by val_top1; Ray always keeps the latest as well
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            # MLflow first: an epoch is in the run before Tune (and ASHA) hears of it.
            callbacks=[*mlflow_callbacks(tracking_uri, run_id), *callbacks],
        ),
    )
    trainer.should_abort = should_abort
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    except (KeyboardInterrupt, TrainRunAborted):
        status = "KILLED"
        raise
    finally:
        if close_run:
            tracking.terminate_run(mlflow_client, run_id, status)
    best = result.best_checkpoints[0][0] if result.best_checkpoints else result.checkpoint
    return TrainOutcome(
        run_id=run_id,
        status=status,
        metrics=dict(result.metrics or {}),
        checkpoint_path=best.path if best is not None else None,
        storage_path=str(storage),
    )


def train_run_exists(storage_path: str | Path, name: str) -> bool:
    """True when a Train run called `name` already has state under `storage_path`."""
    return (Path(storage_path).expanduser() / name).exists()
