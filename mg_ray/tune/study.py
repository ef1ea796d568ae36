"""A hyperparameter study: Ray Tune + OptunaSearch (TPE) + ASHA over Ray Train trials.

    driver (this module)
      |- MLflow parent run of the study (found again by its key on resume)
      |- Tuner(trial_driver, OptunaSearch(define-by-run space, RDB storage), ASHA on `epochs_completed`)
            |- trial_driver (one per trial, a Tune function trainable; its actor is reused)
                  |- mg_ray.train.trainer.fit(...)  -> TorchTrainer named after the trial id,
                                                       MLflow child run keyed <study>/<trial id>

Stopping: when Tune stops a trial (ASHA, the time budget), the study driver has the trial's
driver abort its Train run, and waits for it, before Tune reuses or removes the trial's actor
(`mg_ray.tune.trial_abort`).

Resuming: the Tune experiment lives in <storage>/<study name>; when it exists the same command
restores it (`Tuner.restore`), the Optuna study of the same name is reloaded from its storage, and
trials that were running resume their Train runs from their last checkpoints. Child runs are found
by key, never duplicated. A study name used with a different search space is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray import paths
from mg_ray.config import apply_overrides, from_mapping, to_dict
from mg_ray.train import tracking
from mg_ray.train.config import ExperimentConfig
from mg_ray.tune import trial_abort
from mg_ray.tune.space import SearchSpace, base_config_dict, trial_overrides

STUDY_TAG, ROLE_TAG, TRIAL_TAG, STATE_TAG = "mg_ray.study", "mg_ray.role", "mg_ray.trial_id", "mg_ray.trial_state"
EPOCHS_TAG = "mg_ray.trial_epochs"  # epochs of the trial that Tune (and ASHA) saw
SPACE_HASH_TAG = "mg_ray.space_sha256"
TIME_ATTR = "epochs_completed"
ABORT_WAIT_S = 30.0  # how long the study driver waits for a stopped trial's Train run to abort


@dataclass
class StudyContext:
    """What every trial needs to know about its study (passed with `tune.with_parameters`)."""

    name: str
    base: dict[str, Any]          # base training config as a nested dict
    space: SearchSpace
    tracking_uri: str
    experiment: str
    parent_run_id: str
    train_storage: str            # where the trials' Train runs (and checkpoints) live
    optuna_storage: str           # Optuna RDB storage URL holding the study of the same name


def trial_config(ctx: StudyContext, params: dict[str, Any]) -> ExperimentConfig:
    """The full training config of one trial: base + fixed + sampled parameters."""
    sampled = {k: v for k, v in params.items() if "|" not in k}  # drop conditional helper names
    data = apply_overrides(ctx.base, trial_overrides(ctx.space, sampled))
    data = apply_overrides(data, {"tracking.tracking_uri": ctx.tracking_uri,
                                  "tracking.experiment": ctx.experiment})
    return from_mapping(ExperimentConfig, data)


def trial_driver(params: dict[str, Any], ctx: StudyContext) -> None:
    """One Tune trial: a Ray Train run whose controller runs here, in the trial's actor, and
    reports to Tune through a queue in this process (`mg_ray.tune.trial_report`).

    Tune reuses a trial's actor for the next trial (`reuse_actors`). When Tune stops this trial,
    the study driver asks for the run to be aborted and waits for it (`mg_ray.tune.trial_abort`);
    Tune's session stop event, set when the actor is handed over or removed, aborts it too.
    """
    from ray import tune

    from mg_ray.train.torch_trainer import TrainRunAborted
    from mg_ray.train.trainer import fit
    from mg_ray.tune.trial_report import TuneReporter

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, params)
    # A standby trial waits for a running trial's CPUs before its run starts (abortable, see
    # MgRayTorchTrainer); should another group take them first, its worker group waits on
    # (Ray Train's default gives up after 60 s and retries, logging an error each time).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    # How long Tune waits for this function to return when it hands the actor to the next trial
    # before it gives up and fails that trial (default 2 s; read at the hand-over). Normally the
    # run was aborted before (the study driver waits for that); if not, the abort happens then.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    run_name = train_run_name(ctx, trial_id)
    stop = trial_abort.tune_stop_event()
    reporter = TuneReporter()

    def should_abort() -> bool:
        return stop.is_set() or trial_abort.abort_requested(run_name)

    trial_abort.mark_running(run_name)
    try:
        fit(
            cfg,
            name=run_name,
            storage_path=ctx.train_storage,
            run_key=f"{ctx.name}/{trial_id}",
            parent_run_id=ctx.parent_run_id,
            tags={STUDY_TAG: ctx.name, ROLE_TAG: "trial", TRIAL_TAG: trial_id},
            callbacks=[reporter],
            # The study driver ends the run once Tune has recorded the trial's end. Ended here, a
            # driver killed before Tune saved that would leave a finished run whose trial the
            # resumed study still counts as running, and resumes.
            close_run=False,
            should_abort=should_abort,
        )
        reporter.flush(give_up=should_abort)  # Tune has the last report before the trial ends
    except TrainRunAborted:
        pass  # Tune stopped this trial; the study driver ends its MLflow run
    finally:
        trial_abort.mark_ended(run_name)


def train_run_name(ctx: StudyContext, trial_id: str) -> str:
    """The name of a trial's Train run (its folder under `ctx.train_storage`)."""
    return f"{ctx.name}_{trial_id}"


def make_trial_state_callback(ctx: StudyContext, max_epochs: int):
    """A Tune callback that closes each trial's MLflow child run with its final state, aborts
    the Train run of a trial that Tune stopped, and removes placement groups that dead trial
    actors (their runs' controllers) left behind (`trial_abort.remove_orphaned_placement_groups`)
    whenever a trial starts or ends.

    Every trial's run is ended here, by the study driver, with its state (completed / stopped /
    failed) and the epochs Tune saw, once Tune has recorded how the trial ended. A stopped
    trial's Train run is aborted first (`mg_ray.tune.trial_abort`). The workers go on training
    until the abort reaches them, so a stopped trial's run can hold an epoch more than the tag
    (on the tiny test data an epoch takes 1 s).
    """
    from ray.tune import Callback

    class TrialStateCallback(Callback):
        def _abort(self, trial) -> None:
            """Abort the stopped trial's Train run before Tune reuses or removes its actor."""
            took = trial_abort.abort_and_wait(train_run_name(ctx, trial.trial_id), ABORT_WAIT_S)
            if took is None:
                print(f"trial {trial.trial_id}: its driver did not abort its Train run within "
                      f"{ABORT_WAIT_S:g} s; Tune removes it")
            elif took:
                print(f"trial {trial.trial_id} stopped: Train run aborted in {took:.1f} s")

        def _close(self, trial, state: str, status: str, epochs: int) -> None:
            mlflow_client = tracking.client(ctx.tracking_uri)
            experiment = mlflow_client.get_experiment_by_name(ctx.experiment)
            run = tracking.find_run(mlflow_client, experiment.experiment_id, f"{ctx.name}/{trial.trial_id}")
            if run is None:  # the trial failed before its Train run started
                return
            mlflow_client.set_tag(run.info.run_id, STATE_TAG, state)
            mlflow_client.set_tag(run.info.run_id, EPOCHS_TAG, str(epochs))
            tracking.terminate_run(mlflow_client, run.info.run_id, status)

        def _remove_orphaned_placement_groups(self) -> None:
            for group in trial_abort.remove_orphaned_placement_groups():
                print(f"removed placement group {group}, left by a trial actor that died")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._remove_orphaned_placement_groups()

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = epochs_seen(trial)
            if done >= max_epochs:
                self._close(trial, "completed", "FINISHED", done)
            else:  # ASHA or the time budget
                self._abort(trial)
                self._close(trial, "stopped", "KILLED", done)
            self._remove_orphaned_placement_groups()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "failed", "FAILED", epochs_seen(trial))
            self._remove_orphaned_placement_groups()

    def epochs_seen(trial) -> int:
        # int(): a trial restored from the experiment state on resume can hold it as a float
        return int((trial.last_result or {}).get(TIME_ATTR, 0))

    return TrialStateCallback()


def max_concurrent_trials(space: SearchSpace, cfg: ExperimentConfig) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) can train, plus the space's
    `standby_trials` if their drivers fit beside them; capped by `max_concurrent` and the number
    of trials."""
    import ray

    total = ray.cluster_resources()
    res, study = cfg.resources, space.study
    worker_cpus = res.num_workers * res.cpus_per_worker
    fits = math.floor(total.get("CPU", 0) / (worker_cpus + study.trial_driver_cpus) + 1e-9)
    if res.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // res.num_workers))
    fits = max(1, fits)
    standby = study.standby_trials
    while standby and (fits + standby) * study.trial_driver_cpus + fits * worker_cpus > total.get("CPU", 0) + 1e-9:
        standby -= 1
    concurrent = min(fits + standby, study.num_trials)
    return min(concurrent, study.max_concurrent) if study.max_concurrent else concurrent


def space_fingerprint(space: SearchSpace) -> str:
    payload = json.dumps(to_dict(space) | {"source": None}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


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
) -> dict[str, Any]:
    """Run (or resume) the study; returns a summary dict. Every check runs before any trial, and
    those that need no cluster (config, dataset, tracking server) before Ray starts. `address`:
    the Ray cluster to connect to when not connected yet (default: RAY_ADDRESS or a local one)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from mg_ray.train.job import ensure_dataset
    from mg_ray.train.trainer import check_resources, init_ray
    from mg_ray.tune.scheduling import FinishingASHA, StaggeredLimiter

    if num_trials is not None:
        space.study.num_trials = num_trials
    base = base_config_dict(space)
    if data_root is not None:
        base = apply_overrides(base, {"data.root": str(data_root)})
    # The config every trial starts from (fixed values applied): checked once, here.
    probe = from_mapping(ExperimentConfig, apply_overrides(base, trial_overrides(space, {})))
    ensure_dataset(probe)
    tracking_uri = tracking.resolve_tracking_uri(probe.tracking.tracking_uri)
    tracking.check_tracking_server(tracking_uri)
    init_ray(address)
    res = probe.resources
    check_resources(res.num_workers, res.cpus_per_worker, res.use_gpu,
                    reserved_cpus=space.study.trial_driver_cpus, what=f"each trial of study {study_name!r}")
    concurrency = max_concurrent_trials(space, probe)

    storage = Path(storage_path or paths.ray_storage()).expanduser().resolve()
    experiment_path = storage / study_name
    fingerprint = space_fingerprint(space)
    mlflow_client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(mlflow_client, probe.tracking.experiment)
    existing = tracking.find_run(mlflow_client, experiment_id, f"study/{study_name}")
    if existing is not None and existing.data.tags.get(SPACE_HASH_TAG) != fingerprint:
        raise ValueError(
            f"study {study_name!r} already exists (MLflow run {existing.info.run_id}) with a different "
            f"search space; resume it with the same space file, or choose another --study name"
        )
    parent_run_id, resumed = tracking.start_or_resume_run(
        mlflow_client, experiment_id, f"study/{study_name}", run_name=study_name,
        tags={STUDY_TAG: study_name, ROLE_TAG: "study", SPACE_HASH_TAG: fingerprint,
              "mg_ray.space_file": space.source},
        params={"study.name": study_name, "study.space": space.source,
                **{f"study.{k}": v for k, v in to_dict(space.study).items() if not isinstance(v, dict)},
                "study.max_concurrent_trials": concurrency},
    )
    ctx = StudyContext(
        name=study_name, base=base, space=space, tracking_uri=tracking_uri,
        experiment=probe.tracking.experiment, parent_run_id=parent_run_id,
        train_storage=str(storage / f"{study_name}_train"),
        optuna_storage=optuna_storage or paths.optuna_storage_url(),
    )
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx), {"cpu": space.study.trial_driver_cpus}
    )
    # Tune saves its experiment state (trials, searcher) every 10+ s by default; a driver killed
    # in between would, on resume, forget trials that had started. Save on every step instead:
    # the state of a study of tens of trials is a few kB.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    status = "FAILED"
    try:
        if tune.Tuner.can_restore(str(experiment_path)):
            print(f"resuming study {study_name!r} from {experiment_path}")
            tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_errored=True)
        else:
            searcher = OptunaSearch(
                space.sample,
                metric=space.study.metric,
                mode=space.study.mode,
                storage=optuna.storages.RDBStorage(ctx.optuna_storage),
                study_name=study_name,
                seed=space.study.seed,
            )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=StaggeredLimiter(searcher, concurrency, space.study.trial_stagger_s),
                    scheduler=FinishingASHA(
                        time_attr=TIME_ATTR,
                        metric=space.study.metric,
                        mode=space.study.mode,
                        max_t=probe.optim.epochs,
                        grace_period=space.study.asha.grace_period,
                        reduction_factor=space.study.asha.reduction_factor,
                    ),
                    num_samples=space.study.num_trials,  # concurrency: the ConcurrencyLimiter
                    time_budget_s=space.study.time_budget_s,
                    # A trial's actor (its driver process, Ray Tune, Ray Train, torch and MLflow
                    # imported) goes on to the next trial: one process start fewer per trial.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=study_name,
                    storage_path=str(storage),
                    callbacks=[make_trial_state_callback(ctx, probe.optim.epochs), *(callbacks or [])],
                    verbose=verbose,
                ),
            )
        results = tuner.fit()
        summary = summarise(results, ctx, mlflow_client, space)
        summary["data_root"] = probe.data.root
        if promote and summary.get("best_run_id"):
            from mg_ray.tune.promote import promote_run

            summary["promotion"] = promote_run(
                summary["best_run_id"], space.study.register_as, tracking_uri=tracking_uri,
                metric=space.study.metric, mode=space.study.mode,
                lineage={"study": study_name, "trial": summary["best_trial_id"]},
            )
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.terminate_run(mlflow_client, parent_run_id, status)


def summarise(results, ctx: StudyContext, mlflow_client, space: SearchSpace) -> dict[str, Any]:
    """Log the study summary on the parent run: trials table, best config, Optuna plots."""
    import pandas as pd

    rows = []
    experiment = mlflow_client.get_experiment_by_name(ctx.experiment)
    children = {
        r.data.tags.get(TRIAL_TAG): r
        for r in mlflow_client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{tracking.PARENT_TAG}` = '{ctx.parent_run_id}'",
            max_results=5000,
        )
    }
    detach_orphans(mlflow_client, children, {t.trial_id for t in results._experiment_analysis.trials})
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        child = children.get(trial_id)
        row = {
            "trial_id": trial_id,
            "mlflow_run_id": child.info.run_id if child else None,
            "state": child.data.tags.get(STATE_TAG, "unknown") if child else ("failed" if result.error else "unknown"),
            space.study.metric: metrics.get(space.study.metric),
            f"best_{space.study.metric}": metrics.get(f"best_{space.study.metric}"),
            "epochs_completed": metrics.get(TIME_ATTR),
            "test_top1": metrics.get("test_top1"),
            "start_time": child.info.start_time if child else None,
        }
        row.update({k: v for k, v in (result.config or {}).items() if "|" not in k})
        rows.append(row)
    table = pd.DataFrame(rows)
    score_key = f"best_{space.study.metric}" if space.study.metric == "val_top1" else space.study.metric
    best_row = None
    if len(table) and table[score_key].notna().any():
        # Ties go to the trial that started first, whatever order Tune lists the results in (it
        # differs after a restore): the same rule as `mg-ray promote --study`, so a study run
        # again, or promoted by hand, picks the same best trial.
        ordered = table.sort_values([score_key, "start_time"], ascending=[space.study.mode == "min", True],
                                    na_position="last", kind="mergesort")
        best_row = ordered.iloc[0].to_dict()
    logger = tracking.RunLogger(ctx.tracking_uri, ctx.parent_run_id)
    logger.log_text(table.to_csv(index=False), "study/trials.csv")
    summary: dict[str, Any] = {"study": ctx.name, "num_trials": len(table),
                               "states": table["state"].value_counts().to_dict() if len(table) else {}}
    if best_row is not None:
        best_params = {k: v for k, v in best_row.items() if k.startswith(("loss.", "optim.", "data.", "model."))}
        best_cfg = trial_config(ctx, best_params)
        from mg_ray.config import dump_yaml

        logger.log_text(dump_yaml(best_cfg), "study/best_config.yaml")
        mlflow_client.log_metric(ctx.parent_run_id, f"best_{space.study.metric}", float(best_row[score_key]))
        for key, value in best_params.items():
            mlflow_client.set_tag(ctx.parent_run_id, f"best.{key}", str(value))
        summary.update(best_trial_id=best_row["trial_id"], best_run_id=best_row["mlflow_run_id"],
                       best_score=float(best_row[score_key]), score_name=score_key, best_params=best_params)
    log_optuna_plots(ctx, logger)
    return summary


def detach_orphans(mlflow_client, children: dict[str, Any], trial_ids: set[str]) -> None:
    """Child runs of trials the Tune experiment does not know: a driver killed after a trial
    started but before Tune saved its experiment state leaves one behind, and the resumed study
    runs that trial's slot again under a new id. The run is kept (nothing a user has is deleted)
    but leaves the tree: tagged `orphaned`, ended KILLED, its parent link removed."""
    for trial_id, run in list(children.items()):
        if trial_id in trial_ids:
            continue
        mlflow_client.set_tag(run.info.run_id, STATE_TAG, "orphaned")
        mlflow_client.delete_tag(run.info.run_id, tracking.PARENT_TAG)
        if run.info.status == "RUNNING":
            tracking.terminate_run(mlflow_client, run.info.run_id, "KILLED")
        print(f"MLflow run {run.info.run_id} (trial {trial_id}) belongs to no trial of the resumed "
              f"study: tagged orphaned and detached from the study run")
        del children[trial_id]


def log_optuna_plots(ctx: StudyContext, logger) -> None:
    """Optimisation history, parameter importances, parallel coordinates (matplotlib PNGs)."""
    plt = tracking.load_pyplot()  # before optuna's plotting module imports pyplot
    import optuna
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name=ctx.name, storage=ctx.optuna_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots.items():
            try:
                if name != "optimization_history" and len(complete) < 2:
                    raise ValueError("needs at least 2 completed trials")
                ax = plot(study)
                fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
                fig.set_size_inches(9, 5)
                fig.tight_layout()
                fig.savefig(Path(folder) / f"{name}.png", dpi=100)
                plt.close(fig)
            except Exception as err:  # plots are a convenience: never fail the study on one
                (Path(folder) / f"{name}.txt").write_text(f"not plotted: {err}\n")
        logger.client.log_artifacts(logger.run_id, folder, "study/plots")
