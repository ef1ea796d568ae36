"""A hyperparameter study: Ray Tune + OptunaSearch (TPE) + ASHA over Ray Train trials.

    run_study (this module, the study driver)
      |- MLflow run of the study (found again by its key on resume)
      |- Tuner(run_trial, OptunaSearch(define-by-run space, RDB storage), ASHA on `epochs_completed`)
            |- run_trial (`mg_ray.tune.trial`), one Tune function trainable per trial
                  |- TorchTrainer named after the trial, reporting through TuneReportCallback
      |- TrialRuns (`mg_ray.tune.trial_state`): each trial's MLflow run, opened and ended here
      |- summarise (`mg_ray.tune.results`), then the best trial's model is registered

Resuming: the Tune experiment lives in <storage>/<study name>; when it exists the same command
restores it (`Tuner.restore`), the Optuna study of the same name is reloaded from its storage, and
trials that were running resume their Train runs from their last checkpoints. Trial runs are
found by key, never duplicated. A study name used with a different search space is refused.

Endings: every trial's run ends with its state (`mg_ray.tune.trial_state`). A study interrupted by
Ctrl-C or SIGTERM (`ray job stop`) ends KILLED, registers nothing and raises `StudyInterrupted`;
the same command resumes it. A cluster too small for one trial, or a store short of disk space,
stops it the same way with one line (`StudyStopped`, `mg_ray.tune.watch`). The watches travel in
the Tune experiment (`tuner.pkl`), so a study started by an older mg-ray resumes without them.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune

from mg_ray import paths, ray_env, tracking
from mg_ray.cluster import check_local_resources, check_resources, init_ray
from mg_ray.config import apply_overrides, from_mapping, to_dict
from mg_ray.data import DatasetIndex
from mg_ray.data.check import ensure_dataset
from mg_ray.data.video_io import dataset_fingerprint
from mg_ray.model_file import model_spec
from mg_ray.registry import promote_run
from mg_ray.tracking import tags
from mg_ray.train.checkpoint import checkpoint_mb
from mg_ray.train.config import ExperimentConfig
from mg_ray.train.loop import SharedIndex
from mg_ray.tune import trial_state
from mg_ray.tune.lock import driver_lock
from mg_ray.tune.results import summarise
from mg_ray.tune.scheduling import FinishingASHA, StudySearch
from mg_ray.tune.space import SearchSpace, base_config_dict, definition_fingerprint, trial_overrides
from mg_ray.tune.trial import StudyContext, run_trial
from mg_ray.tune.watch import DiskWatch, ResourceWatch, StudyStopped, local_folder


class StudyInterrupted(KeyboardInterrupt):
    """The study was interrupted (Ctrl-C, SIGTERM); its state is saved and the same command
    resumes it. `signum`: the signal (the process exits 128 + signum)."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def max_concurrent_trials(
    space: SearchSpace, cfg: ExperimentConfig, total: dict[str, float]
) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) can train, plus the space's
    `standby_trials`, capped by `max_concurrent` and the number of trials.

    Tune places only the trial functions (a small CPU share each); the Train workers wait for
    their own placement groups. A standby trial's driver and Train controller start up while the
    others train, and its placement group is placed the moment a running trial's is freed
    (`benchmarks/bench_trial_overhead.py` measures what that saves); more than that would only
    queue more workers."""
    res, study = cfg.resources, space.study
    fits = math.floor(
        total.get("CPU", 0) / (res.num_workers * res.cpus_per_worker + study.trial_driver_cpus)
        + 1e-9
    )
    if res.use_gpu:
        fits = min(
            fits, math.floor(total.get("GPU", 0) / (res.num_workers * res.gpus_per_worker) + 1e-9)
        )
    concurrent = min(max(1, fits) + study.standby_trials, study.num_trials)
    return min(concurrent, study.max_concurrent) if study.max_concurrent else concurrent


@dataclass
class Checked:
    """What `preflight` established about a study before anything started."""

    base: dict[str, Any]  # the base training config, with the dataset root applied
    probe: ExperimentConfig  # the config every trial starts from (fixed values applied)
    tracking_uri: str
    request: dict[str, Any]  # the resource request of one trial, for `check_resources`
    index: DatasetIndex  # the dataset's, loaded and checked: every trial's workers share it

    def for_space(self, space: SearchSpace) -> Checked:
        """The same checks for `space` where it differs from the checked one only in fixed values
        that need no check of their own: a pipeline's stage once the runs it starts from are
        known (checked before with placeholder run ids)."""
        return replace(self, probe=probe_config(space, self.base))


def probe_config(space: SearchSpace, base: dict[str, Any]) -> ExperimentConfig:
    """The config every trial of `space` starts from: `base` with the fixed values applied."""
    return from_mapping(ExperimentConfig, apply_overrides(base, trial_overrides(space, {})))


def preflight(
    space: SearchSpace,
    *,
    study_name: str,
    data_root: str | None,
    address: str | None,
    loaded: dict[tuple, DatasetIndex] | None = None,
) -> Checked:
    """Every check that needs no cluster, before Ray starts: the config every trial starts from,
    the dataset (generated when it is the default synthetic one), the MLflow store, and on a
    local cluster the CPUs a trial needs. `loaded`: indexes loaded before, by
    `DataConfig.index_source()` (a pipeline's stages read one dataset: it is loaded once)."""
    base = base_config_dict(space)
    if data_root is not None:
        base = apply_overrides(base, {"data.root": str(data_root)})
    probe = probe_config(space, base)
    source = probe.data.index_source()
    known = loaded.get(source) if loaded is not None else None
    index = ensure_dataset(probe.data, rgb=probe.model.modality != "pose", index=known)
    if loaded is not None:
        loaded[source] = index
    tracking_uri = tracking.resolve_tracking_uri(probe.tracking.tracking_uri)
    tracking.check_store(tracking_uri)
    res = probe.resources
    request = dict(
        num_workers=res.num_workers,
        cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu,
        gpus_per_worker=res.gpus_per_worker,
        reserved_cpus=space.study.trial_driver_cpus,
        what=f"each trial of study {study_name!r}",
    )
    check_local_resources(address, **request)
    return Checked(base, probe, tracking_uri, request, index)


def check_storage(storage_path: str | Path | None, optuna_storage: str | None) -> tuple[Path, str]:
    """The Ray storage folder and the Optuna storage URL, both checked writable."""
    storage = paths.ensure_writable(
        Path(storage_path or paths.ray_storage()).expanduser().resolve(),
        "Ray storage (--storage-path)",
    )
    optuna_storage = optuna_storage or paths.optuna_storage_url()
    if paths.sqlite_file(optuna_storage):
        paths.ensure_writable_file(
            paths.sqlite_file(optuna_storage), f"Optuna storage {optuna_storage}"
        )
    return storage, optuna_storage


def run_study(
    space: SearchSpace,
    *,
    study_name: str,
    data_root: str | None = None,
    num_trials: int | None = None,
    storage_path: str | Path | None = None,
    optuna_storage: str | None = None,
    promote: bool = True,
    verbose: int = 1,
    callbacks: list | None = None,
    address: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    checked: Checked | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study; returns a summary dict. Every check runs before any trial, and
    those that need no cluster (config, dataset, stores, a local cluster's CPUs) before Ray
    starts; a second driver of the study is refused first (`lock.driver_lock`). `address`: the
    Ray cluster to connect to (default: RAY_ADDRESS or a local one). `parent_run_id`, `tags`:
    the study's MLflow run is nested under that run, with those tags (a pipeline's stage).
    `checked`: `preflight`'s result when the caller ran it already (a pipeline checks every stage
    before the first starts)."""
    storage, optuna_storage = check_storage(storage_path, optuna_storage)
    with driver_lock(storage, study_name):
        return _run_study(
            space,
            study_name=study_name,
            data_root=data_root,
            num_trials=num_trials,
            storage=storage,
            optuna_storage=optuna_storage,
            promote=promote,
            verbose=verbose,
            callbacks=callbacks,
            address=address,
            parent_run_id=parent_run_id,
            tags=tags,
            checked=checked,
        )


def _run_study(
    space: SearchSpace,
    *,
    study_name: str,
    data_root: str | None,
    num_trials: int | None,
    storage: Path,
    optuna_storage: str,
    promote: bool,
    verbose: int,
    callbacks: list | None,
    address: str | None,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    checked: Checked | None,
) -> dict[str, Any]:
    """`run_study` once the study's lock is held: setup, the tuner, fit, close."""
    # setup: checks, the cluster, the study's MLflow run
    if num_trials is not None:
        space.study.num_trials = num_trials
    if checked is None:
        checked = preflight(space, study_name=study_name, data_root=data_root, address=address)
    else:
        checked = checked.for_space(space)
    client = tracking.client(checked.tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, checked.probe.tracking.experiment)
    done = tracking.finished_run(  # a changed space is refused here
        client,
        experiment_id,
        study_key(study_name),
        definition_fingerprint(space),
        f"study {study_name!r}",
    )
    if done is not None:  # the study is over: report it (and register its best) without Ray
        print(
            f"study {study_name!r}: completed before (MLflow run {done.info.run_id}), not run again"
        )
        return conclude(
            client, space, checked, study_name, done.info.run_id, optuna_storage, promote
        )
    init_ray(address)
    check_resources(**checked.request)
    concurrency = max_concurrent_trials(space, checked.probe, ray.cluster_resources())
    ctx = open_study(
        client,
        experiment_id,
        space,
        checked,
        study_name=study_name,
        storage=storage,
        optuna_storage=optuna_storage,
        concurrency=concurrency,
        parent_run_id=parent_run_id,
        extra_tags=tags,
    )

    # the tuner: a new one, or the interrupted study's restored
    tuner = build_tuner(
        space,
        ctx,
        checked.probe,
        storage=storage,
        concurrency=concurrency,
        verbose=verbose,
        index=SharedIndex.put(checked.probe.data, checked.index),
        callbacks=[
            ResourceWatch(checked.request, space.study.placement_timeout_s),
            DiskWatch(
                study_folders(ctx, client),
                space.study.min_free_disk_mb,
                checkpoints=local_folder(ctx.train_storage),
                expected_checkpoint_mb=checkpoint_mb(study_model_spec(checked)),
            ),
            *(callbacks or []),
        ],
    )
    session = trial_state.begin(ctx)
    status = "FAILED"
    try:
        # fit, then close every trial's run and the study's
        results = tuner.fit()
        session.restore_signals()
        epochs = {
            r.metrics["trial_id"]: int(r.metrics.get(trial_state.TIME_ATTR, 0))
            for r in results
            if r.metrics and "trial_id" in r.metrics
        }
        unfinished = trial_state.close_unfinished(session, epochs)
        for trial_id in unfinished:
            print(
                f"trial {trial_id}: {'interrupted' if session.interrupted else 'cut by the time budget'}"
            )
        if not session.interrupted and space.study.time_budget_s:
            waiting = trial_state.close_not_started(session, epochs)
            for trial_id in waiting:
                print(f"trial {trial_id}: cut by the time budget while it waited to start")
            unfinished += waiting
        trial_state.settle_optuna_trials(session, unfinished)
        detach_orphans(client, ctx.parent_run_id)
        if session.interrupted:
            status = "KILLED"
            raise StudyInterrupted(
                f"study {study_name!r} interrupted; run the same command to resume it",
                session.signum,
            )
        summary = conclude(
            client, space, checked, study_name, ctx.parent_run_id, optuna_storage, promote
        )
        status = "FINISHED"
        return summary
    except StudyStopped:  # its trials resume with the same command, as after Ctrl-C
        session.interrupted = True
        status = "KILLED"
        raise
    except KeyboardInterrupt as err:  # also a second Ctrl-C, which Tune lets through
        session.interrupted = True
        session.signum = getattr(err, "signum", session.signum)
        status = "KILLED"
        raise
    finally:
        session.restore_signals()
        # Runs still open here: the study failed, or a second Ctrl-C came. Their trials end with
        # this process (a local cluster) or with its Ray job, so nothing is waited for.
        trial_state.close_unfinished(session, {}, wait=False)
        tracking.terminate_run(client, ctx.parent_run_id, status)


def study_key(study_name: str) -> str:
    """The key of a study's MLflow run."""
    return f"study/{study_name}"


def conclude(
    client,
    space: SearchSpace,
    checked: Checked,
    study_name: str,
    study_run_id: str,
    optuna_storage: str,
    promote: bool,
) -> dict[str, Any]:
    """The summary of a study whose trials have all ended, and its best trial registered
    (`client`: the study driver's MLflow client)."""
    study = space.study
    summary = summarise(
        client,
        study_run_id,
        client.get_run(study_run_id).info.experiment_id,
        study_name,
        metric=study.metric,
        mode=study.mode,
        searched=list(space.parameters),
        optuna_storage=optuna_storage,
        tracking_uri=checked.tracking_uri,
    )
    summary["data_root"] = str(checked.probe.data.root)
    summary["study_run_id"] = study_run_id
    if promote and summary.get("best_run_id"):
        summary["promotion"] = promote_run(
            summary["best_run_id"],
            study.register_as,
            tracking_uri=checked.tracking_uri,
            metric=study.metric,
            mode=study.mode,
            context={"study": study_name, "trial": summary["best_trial_id"]},
        )
    return summary


def study_model_spec(checked: Checked) -> dict[str, Any]:
    """The model the study's trials train, with the probe's values. A searched frame count
    changes only the fusion module's pose projections, whose temporal kernel is the pose-to-RGB
    frame ratio: a few percent of the small preset's state."""
    probe, index = checked.probe, checked.index
    return model_spec(
        probe.model, probe.data, index.num_classes, probe.data.pose_channels(index.layout)
    )


def open_study(
    client,
    experiment_id: str,
    space: SearchSpace,
    checked: Checked,
    *,
    study_name: str,
    storage: Path,
    optuna_storage: str,
    concurrency: int,
    parent_run_id: str | None,
    extra_tags: dict[str, str] | None,
) -> StudyContext:
    """The study's MLflow run, opened (or reopened, on resume: a changed space is refused), and
    the context every trial gets. `client`, `experiment_id`: the driver's, for the study's
    experiment."""
    key, fingerprint = study_key(study_name), definition_fingerprint(space)
    study_run_id, _ = tracking.start_or_resume_run(  # a changed space is refused here
        client,
        experiment_id,
        key,
        run_name=study_name,
        what=f"study {study_name!r}",
        parent_run_id=parent_run_id,
        tags={
            tags.STUDY: study_name,
            tags.ROLE: "study",
            tags.DEFINITION: fingerprint,
            tags.SPACE_FILE: space.source,
            **(extra_tags or {}),
        },
        params={
            "study.name": study_name,
            "study.space": space.source,
            **{f"study.{k}": v for k, v in to_dict(space.study).items() if not isinstance(v, dict)},
            "study.max_concurrent_trials": concurrency,
            # the ranges searched, beside the values each trial run has under the same names
            **{f"search.{name}": p.describe() for name, p in space.parameters.items()},
        },
    )
    return StudyContext(
        name=study_name,
        base=checked.base,
        space=space,
        tracking_uri=checked.tracking_uri,
        experiment=checked.probe.tracking.experiment,
        parent_run_id=study_run_id,
        train_storage=str(storage / f"{study_name}_train"),
        optuna_storage=optuna_storage,
        max_epochs=checked.probe.optim.epochs,
        dataset_fingerprint=dataset_fingerprint(checked.probe.data.root),
    )


def build_tuner(
    space: SearchSpace,
    ctx: StudyContext,
    probe: ExperimentConfig,
    *,
    storage: Path,
    concurrency: int,
    verbose: int,
    callbacks: list | None,
    index: SharedIndex | None = None,
) -> tune.Tuner:
    """Ray Tune's `Tuner` of the study: OptunaSearch (TPE, its study in the RDB storage), ASHA on
    the epochs a trial completed, `TrialRuns` for the trials' MLflow runs. An experiment that
    exists under `storage` is restored instead (the same command resumes a study). `index`: the
    dataset's index for every trial's workers."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, index=index),
        {"cpu": space.study.trial_driver_cpus},
    )
    ray_env.apply_defaults(ray_env.STUDY_DRIVER)
    experiment_path = storage / ctx.name
    if tune.Tuner.can_restore(str(experiment_path)):
        print(f"resuming study {ctx.name!r} from {experiment_path}")
        # Unfinished trials go on from their checkpoints; failed ones stay failed. Tune requeues
        # errored trials outside `max_concurrent_trials`: more trial functions than the cluster
        # fits would then hold the CPUs their worker groups wait for, and the resumed study would
        # wait for ever. A failure worth retrying (a lost node) was retried in its session
        # (`study.trial_max_failures`).
        return tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_errored=False)
    study = space.study
    objective = tracking.score_name(study.metric)  # the score of the model a trial would register
    searcher = StudySearch(
        space.sample,
        time_attr=trial_state.TIME_ATTR,
        max_t=probe.optim.epochs,
        metric=objective,
        mode=study.mode,
        storage=optuna.storages.RDBStorage(ctx.optuna_storage),
        study_name=ctx.name,
        sampler=optuna.samplers.TPESampler(
            seed=study.seed, n_startup_trials=study.tpe_startup_trials or 10
        ),
        points_to_evaluate=space.optuna_points() or None,
    )
    scheduler = FinishingASHA(  # its rungs hold each trial's running best
        time_attr=trial_state.TIME_ATTR,
        metric=objective,
        mode=study.mode,
        max_t=probe.optim.epochs,
        grace_period=study.asha.grace_period,
        reduction_factor=study.asha.reduction_factor,
        history=trial_state.RunHistory(ctx),  # its rungs rebuilt when the study is resumed
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=study.num_trials,
            max_concurrent_trials=concurrency,
            time_budget_s=study.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=ctx.name,
            storage_path=str(storage),
            verbose=verbose,
            callbacks=[trial_state.TrialRuns(ctx.name), *(callbacks or [])],
            failure_config=tune.FailureConfig(max_failures=study.trial_max_failures),
        ),
    )


def study_folders(ctx: StudyContext, client) -> list[Path]:
    """The local folders a study writes to: the trials' checkpoints, the MLflow store and the
    experiment's artifacts, the Optuna storage (a server's store is not ours to watch)."""
    experiment = client.get_experiment_by_name(ctx.experiment)
    uris = [ctx.train_storage, ctx.tracking_uri, ctx.optuna_storage]
    if experiment is not None:
        uris.append(experiment.artifact_location)
    folders = [local_folder(uri) for uri in uris]
    return list(dict.fromkeys(f for f in folders if f is not None))


def detach_orphans(mlflow_client, parent_run_id: str) -> None:
    """Trial runs still RUNNING once every trial this session ran has been closed belong to
    trials the Tune experiment does not know: a driver killed after a trial started but before
    Tune saved its experiment state leaves one behind, and the resumed study runs that trial's
    slot again under a new id. The run is kept (nothing a user has is deleted) but leaves the
    tree: tagged `orphaned`, ended KILLED, its parent link removed."""
    for run in mlflow_client.search_runs(
        [mlflow_client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{tags.PARENT}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=5000,
    ):
        mlflow_client.set_tag(run.info.run_id, tags.STATE, "orphaned")
        mlflow_client.delete_tag(run.info.run_id, tags.PARENT)
        tracking.terminate_run(mlflow_client, run.info.run_id, "KILLED")
        print(
            f"MLflow run {run.info.run_id} (trial {run.data.tags.get(tags.TRIAL)}) belongs to no "
            f"trial of the resumed study: tagged orphaned and detached from the study run"
        )
