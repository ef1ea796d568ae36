"""Every trial's MLflow run, from the study driver: opened when Tune starts the trial, ended with
how the trial ended.

`TrialRuns` is a Tune callback. It opens a trial's run (or reopens it, for a trial resumed after
a crash) when Tune starts the trial, before the trial's function runs, and ends it when Tune
reports the trial's end:

    completed    FINISHED  the trial trained all its epochs
    stopped      FINISHED  ASHA stopped it (stop reason `asha`), or the time budget ran out
                           (`time_budget`): a normal ending of a search, not a kill (Optuna
                           has the trial PRUNED, `mg_ray.tune.scheduling.StudySearch`)
    failed       FAILED    its Train run raised
    interrupted  KILLED    the study was interrupted (Ctrl-C, SIGTERM: `ray job stop`) while it
                           ran; the same command resumes it, and reopens its run

Tune tells its callbacks nothing about the trials still running when the study ends early
(`time_budget_s`, an interruption): `close_unfinished` ends those once `Tuner.fit()` has returned
and the trials' Train workers are gone; `close_not_started` ends those the time budget ended
while they waited to start (created, or restored by a resume, but not started yet).

`Session.interrupted` says whether the study ended because of a Ctrl-C or a SIGTERM: Tune catches
the first SIGINT and returns from `fit()` normally, so this callback wraps the SIGINT handler Tune
installs (in `setup`, which Tune calls after installing it) and hands a SIGTERM to the same
handler; `Session.restore_signals` undoes that after `fit()`.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.tune import Callback
from ray.util.state import list_actors

from mg_ray import tracking
from mg_ray.config import flatten, to_dict
from mg_ray.tracking import tags
from mg_ray.tracking.models import log_run_model
from mg_ray.tune.results import study_runs
from mg_ray.tune.scheduling import (
    MLFLOW_RUN_ID,
    MLFLOW_RUN_URL,
    backfill_optuna_trials,
    prune_optuna_trials,
    tag_optuna_trial,
)
from mg_ray.tune.trial import StudyContext, run_key, train_run_name, trial_config

# A trial's state (the `mg_ray.trial_state` tag) -> the status its MLflow run ends with.
RUN_STATUS = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}
TIME_ATTR = "epochs_completed"  # the epochs a trial completed, as its Train run reports them
TRAIN_ACTORS = (
    "TrainController",
    "RayTrainWorker",
)  # Ray Train's actors, as the State API names them


@dataclass
class Session:
    """What this process knows of a study it runs: its context, the trials whose runs are open,
    whether a Ctrl-C came. Kept here, not on the callback: a resumed study's callback is the copy
    Tune restores from the experiment state, with the context of the session that started it."""

    ctx: StudyContext
    open: dict[str, str] = field(default_factory=dict)  # trial id -> run id, opened and not ended
    interrupted: bool = False
    signum: int = signal.SIGINT  # the signal that interrupted it
    sigterm_before: Any = None  # the SIGTERM handler `TrialRuns.setup` replaced
    configs: dict[str, dict] = field(default_factory=dict)  # every trial's, as `fit()` ended
    # per trial the study's early end closed: the (epoch, score) its run held then (`close_early`)
    held: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def restore_signals(self) -> None:
        """Put back the SIGTERM handler of before `fit()` (Tune restores its SIGINT one)."""
        if self.sigterm_before is not None:
            signal.signal(signal.SIGTERM, self.sigterm_before)
            self.sigterm_before = None


_sessions: dict[str, Session] = {}


def begin(ctx: StudyContext) -> Session:
    """Called by the study driver before `Tuner.fit()`."""
    _sessions[ctx.name] = Session(ctx)
    return _sessions[ctx.name]


class TrialRuns(Callback):
    def __init__(self, study: str) -> None:
        self.study = study

    @property
    def session(self) -> Session:
        return _sessions[self.study]

    # ---- Tune's callback interface -------------------------------------------------------------
    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)
        session = self.session
        session.sigterm_before = signal.getsignal(signal.SIGTERM)

        def on_stop(signum, frame):
            # The first SIGINT or SIGTERM stops the study as Tune stops it on Ctrl-C (the
            # experiment state saved, `fit()` returns); a second one ends it at once.
            session.interrupted, session.signum = True, signum
            session.restore_signals()
            if callable(tune_handler):
                tune_handler(signal.SIGINT, frame)
            else:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGTERM, on_stop)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        """Open the trial's run before its function runs (the function fills in its config)."""
        self.session.open[trial.trial_id] = open_run(self.session.ctx, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if epochs_seen(trial) >= self.session.ctx.max_epochs:
            close(self.session, trial.trial_id, "completed", epochs_seen(trial))
        else:
            close(self.session, trial.trial_id, "stopped", epochs_seen(trial), reason="asha")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A failed trial Tune restarts (`study.trial_max_failures`): its run stays open."""
        run_id = self.session.open.get(trial.trial_id)
        if run_id is not None:
            tracking.client(self.session.ctx.tracking_uri).set_tag(run_id, tags.STATE, "retrying")
        print(f"trial {trial.trial_id} failed; Tune restarts it from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        close(self.session, trial.trial_id, "failed", epochs_seen(trial))

    def on_experiment_end(self, trials, **info) -> None:
        """Tune's trials as `fit()` ends, with their configs: one the time budget ended before it
        started has no run yet, and one a resume restored and had not restarted has its
        run left `interrupted` (`close_not_started`)."""
        self.session.configs = {t.trial_id: dict(t.config) for t in trials}


def open_run(ctx: StudyContext, trial_id: str) -> str:
    """Open (or reopen, for a resumed trial) a trial's MLflow run, and link its Optuna trial and
    its run to each other; returns the run's id."""
    client = tracking.client(ctx.tracking_uri)
    experiment_id = client.get_experiment_by_name(ctx.experiment).experiment_id
    run_id, resumed = tracking.start_or_resume_run(
        client,
        experiment_id,
        run_key(ctx, trial_id),
        run_name=f"{ctx.name}_{trial_id}",
        parent_run_id=ctx.parent_run_id,
        tags={
            tags.STUDY: ctx.name,
            tags.ROLE: "trial",
            tags.TRIAL: trial_id,
            tags.TRAIN_RUN: train_run_name(ctx, trial_id),
            tags.STORAGE_PATH: ctx.train_storage,
        },
    )
    if resumed:  # how it ended before no longer holds
        client.set_tag(run_id, tags.STATE, "running")
        if tags.STOP_REASON in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, tags.STOP_REASON)
    number = tag_optuna_trial(  # the Optuna trial drawn for it links back to its run
        ctx.optuna_storage,
        ctx.name,
        trial_id,
        **{
            MLFLOW_RUN_ID: run_id,
            MLFLOW_RUN_URL: tracking.ui_link(
                tracking.ui_base(ctx.tracking_uri), experiment_id, run_id
            ),
        },
    )
    if number is not None:  # and the run names it: ties between trials follow it
        client.set_tag(run_id, tags.OPTUNA_TRIAL, str(number))
    return run_id


def close_not_started(session: Session, epochs: dict[str, int]) -> list[str]:
    """After a study its time budget ended: end the runs of the trials Tune held unstarted then,
    which `close_unfinished` does not know (their runs are not open in this session), as the
    budget's trials end: `stopped`/`time_budget`, with the epochs Tune saw (`epochs`, per trial
    id). Returns their trial ids. Two kinds:
    - a trial Tune had created but not started (its config drawn, its Optuna trial RUNNING):
      it gets the run it would have had, with its config as parameters, after 0 epochs;
    - a trial a resume restored and had not restarted yet: its run, left `interrupted` (KILLED)
      by the interruption, is reopened and ended.
    Without this, such a trial is TERMINATED in Tune, RUNNING in Optuna for ever, and missing or
    `interrupted` in MLflow in a study that is over."""
    ctx = session.ctx
    client = tracking.client(ctx.tracking_uri)
    experiment_id = client.get_experiment_by_name(ctx.experiment).experiment_id
    states = {
        r.data.tags.get(tags.TRIAL): r.data.tags.get(tags.STATE)
        for r in study_runs(client, experiment_id, ctx.name)
    }
    ended = ("completed", "stopped", "failed")
    left = [t for t in session.configs if t not in session.open and states.get(t) not in ended]
    for trial_id in left:
        run_id = session.open[trial_id] = open_run(ctx, trial_id)
        if trial_id not in states:
            config = flatten(to_dict(trial_config(ctx, session.configs[trial_id])))
            tracking.log_params(client, run_id, config)
        close_early(session, trial_id, "stopped", epochs.get(trial_id, 0), reason="time_budget")
    return left


def close_unfinished(session: Session, epochs: dict[str, int], wait: bool = True) -> list[str]:
    """After `Tuner.fit()`: end the runs of trials that were still running when the study ended
    (the time budget, or a Ctrl-C), once their Train workers are gone (`wait`); returns their
    trial ids. `epochs`: the epochs Tune saw, per trial id."""
    if not session.open:
        return []
    if wait:
        wait_for_train_actors_to_end()
    state, reason = ("interrupted", None) if session.interrupted else ("stopped", "time_budget")
    ended = list(session.open)
    for trial_id in ended:
        try:
            close_early(session, trial_id, state, epochs.get(trial_id, 0), reason=reason)
        except Exception as err:  # noqa: BLE001 (one run that cannot be closed must not keep the others open)
            print(f"warning: trial {trial_id}: its MLflow run could not be closed ({err})")
    return ended


def close_early(session: Session, trial_id: str, state: str, seen: int, reason: str | None) -> None:
    """End the run of a trial the study's early end caught (its time budget, an interruption)
    with the epochs the run holds, `seen` (Tune's count) or one more: the Train controller logs
    an epoch as soon as its checkpoint is recorded, before Tune's report of it arrives. What the
    run held is kept in `session.held`, for `settle_optuna_trials` to give Optuna the same."""
    held = session.held[trial_id] = RunHistory(session.ctx)(trial_id)
    close(session, trial_id, state, max(seen, held[-1][0] if held else 0), reason=reason)


def settle_optuna_trials(session: Session, trial_ids: list[str]) -> None:
    """After `close_unfinished` (and `close_not_started`) ended these trials' runs: their Optuna
    trials get every epoch the runs held then (`session.held`), the epochs their
    `mg_ray.trial_epochs` counts. An interrupted study's stay RUNNING and resume from there; the
    time budget's are PRUNED, with the last of those epochs as their value."""
    ctx = session.ctx
    histories = {t: session.held.get(t, []) for t in trial_ids}
    backfill_optuna_trials(ctx.optuna_storage, ctx.name, histories)
    if not session.interrupted:
        prune_optuna_trials(ctx.optuna_storage, ctx.name, trial_ids)


def close(
    session: Session, trial_id: str, state: str, epochs: int, reason: str | None = None
) -> None:
    """End a trial's run: its state and the epochs it ran as tags, the matching run status. The
    trial stays among the open ones until its run has ended: cut short (a second Ctrl-C, say), the
    study's last `close_unfinished` ends it."""
    run_id = session.open.get(trial_id)
    if run_id is None:
        return
    client = tracking.client(session.ctx.tracking_uri)
    ending = {tags.STATE: state, tags.EPOCHS: str(epochs)}
    if reason:
        ending[tags.STOP_REASON] = reason
    for key, value in ending.items():
        client.set_tag(run_id, key, value)
    if state in ("completed", "stopped"):
        log_run_model(client, run_id, session.ctx.tracking_uri)
    tracking.terminate_run(client, run_id, RUN_STATUS[state])
    session.open.pop(trial_id, None)
    if state in ("completed", "stopped"):
        log_study_progress(client, session.ctx)


def log_study_progress(client, ctx: StudyContext) -> None:
    """The study run's `best_so_far_<metric>`: the best score (`tracking.run_score`) of the trials
    finished so far (completed or stopped), at step = how many there are; in MLflow a chart of
    the search's progress. Read back from the trial runs, so a resumed study goes on from the same
    history."""
    metric, mode = ctx.space.study.metric, ctx.space.study.mode
    experiment = client.get_experiment_by_name(ctx.experiment).experiment_id
    scores = [
        tracking.run_score(r, metric)
        for r in study_runs(client, experiment, ctx.name)
        if r.data.tags.get(tags.STATE) in ("completed", "stopped")
    ]
    scores = [s for s in scores if s is not None]
    if scores:
        client.log_metric(
            ctx.parent_run_id,
            f"best_so_far_{metric}",
            max(scores) if mode == "max" else min(scores),
            step=len(scores),
        )


@dataclass
class RunHistory:
    """What a study's trial reported before, read back from its MLflow run: (epochs completed,
    the study's objective, `tracking.score_name`) per epoch, the last value logged at each step.
    `FinishingASHA` replays it into its rungs when a resumed study restores the trial, and a study
    that ends early counts a trial's epochs from it (`close_early`)."""

    ctx: StudyContext

    def __call__(self, trial_id: str) -> list[tuple[int, float]]:
        client = tracking.client(self.ctx.tracking_uri)
        experiment = client.get_experiment_by_name(self.ctx.experiment)
        run = (
            tracking.find_run(client, experiment.experiment_id, run_key(self.ctx, trial_id))
            if experiment is not None
            else None
        )
        if run is None:
            return []
        history = client.get_metric_history(
            run.info.run_id, tracking.score_name(self.ctx.space.study.metric)
        )
        by_step = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        return [(step + 1, value) for step, value in sorted(by_step.items())]


def epochs_seen(trial: Any) -> int:
    # int(): a trial restored from the experiment state on resume can hold it as a float
    return int((trial.last_result or {}).get(TIME_ATTR, 0))


def wait_for_train_actors_to_end(timeout_s: float = 60.0) -> None:
    """Wait until this job's Train controllers and workers are dead (Tune has killed the trials'
    actors, which own them: they end a moment later), through Ray's State API. When the State API
    does not answer (a Ctrl-C in the terminal of a local cluster reaches its dashboard too), there
    is nothing to wait for: the local cluster ends with this process."""
    context = ray.get_runtime_context()
    job_id = context.get_job_id()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            alive = [
                a
                for a in list_actors(
                    # this cluster's, by address: without one, the State API looks for "the"
                    # cluster on this host, and another one running here (a second study's, a
                    # `ray start` cluster) makes that fail, or answer for the wrong cluster
                    address=context.gcs_address,
                    filters=[("job_id", "=", job_id), ("state", "=", "ALIVE")],
                    limit=10_000,
                    timeout=5,
                    raise_on_missing_output=False,
                )
                if a.class_name in TRAIN_ACTORS
            ]
        except Exception as err:  # noqa: BLE001 (the State API's failures: HTTP errors, timeouts, ...)
            print(
                f"note: Ray's State API did not answer ({type(err).__name__}); not waiting for Train actors"
            )
            return
        if not alive:
            return
        if time.monotonic() > deadline:
            print(
                f"warning: {len(alive)} Ray Train actor(s) of this study still alive after {timeout_s:g} s"
            )
            return
        time.sleep(0.5)
