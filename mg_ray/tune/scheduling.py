"""How a study's trials are drawn, scored and ended early, as Ray Tune, ASHA and Optuna see them:
ASHA that lets a trial at its last epoch end by itself and remembers on resume what the trials
reported before, and an OptunaSearch whose Optuna trials are PRUNED when ASHA stops them."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

# A trial id -> the (epochs completed, metric value) it reported before, in order.
History = Callable[[str], list[tuple[int, float]]]


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial at its last epoch end by itself instead of stopping it, and that
    rebuilds its rungs when its study is resumed.

    Ray's ASHA answers STOP to every result at `max_t`, although the trial's training ends right
    after that report anyway. Tune would then kill the trial's actor while its Train run is
    finishing: the run would end as killed, not finished, and its workers' CPUs would wait for Ray
    Train's placement-group cleaner instead of being handed back as the run ends. Trials below
    `max_t` are promoted or stopped by ASHA's rungs as before, and a trial at `max_t` is counted
    in its rung when it completes (`on_trial_complete`), as before.

    Tune leaves the scheduler out of its experiment state, so a resumed study's ASHA starts with
    empty rungs and would prune only against results reported after the resume. `history` gives
    back what each trial reported before (its MLflow run's metric history): when Tune adds a
    restored trial, those results are replayed into the rungs (a finished trial then leaves the
    scheduler as it did when it ended). Only public methods are overridden (`on_trial_add`,
    `on_trial_result`: Tune's scheduler interface).
    """

    def __init__(
        self, *, time_attr: str, metric: str, max_t: int, history: History | None = None, **kwargs
    ) -> None:
        super().__init__(time_attr=time_attr, metric=metric, max_t=max_t, **kwargs)
        self.finish_attr, self.finish_at, self.rung_metric = time_attr, max_t, metric
        self.history = history

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self.finish_attr, 0) >= self.finish_at:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = getattr(self, "history", None)  # None in a study built before it existed
        past = history(trial.trial_id) if history is not None else []
        results = [{self.finish_attr: epochs, self.rung_metric: value} for epochs, value in past]
        for result in results:
            if result[self.finish_attr] < self.finish_at:
                super().on_trial_result(tune_controller, trial, result)
        if results and getattr(trial, "status", None) == "TERMINATED":  # it ended before
            if results[-1][self.finish_attr] >= self.finish_at:
                self.on_trial_complete(tune_controller, trial, results[-1])
            else:
                self.on_trial_remove(tune_controller, trial)


# What an Optuna trial carries to find its Tune trial and MLflow run again (user attributes).
TUNE_TRIAL_ID, MLFLOW_RUN_ID, MLFLOW_RUN_URL = "tune_trial_id", "mlflow_run_id", "mlflow_run_url"


@dataclass
class DefineByRun:
    """The study's define-by-run space, which also writes on each Optuna trial the id of the Tune
    trial it was drawn for (`StudySearch.suggest` sets `trial_id` just before Optuna calls it)."""

    sample: Callable[[Any], dict[str, Any]]
    trial_id: str | None = None

    def __call__(self, ot_trial) -> dict[str, Any]:
        if self.trial_id is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ID, self.trial_id)
        return self.sample(ot_trial)


class StudySearch(OptunaSearch):
    """OptunaSearch whose Optuna study says what Tune did with each trial.

    - Every epoch reaches Optuna as an intermediate value, at step = the epochs the trial
      completed (`time_attr`; Tune's own `training_iteration` starts again when a trial is
      restored), the result ASHA stops a trial on included: Tune hands the searcher no result it
      stops a trial on, only the trial's completion.
    - A trial that ends without error before its last epoch (`max_t`: ASHA stopped it) is
      PRUNED, and Optuna gives a pruned trial its last intermediate value. Ray's OptunaSearch
      would tell it COMPLETE with that value, and TPE would take an epoch-1 score for a finished
      run. Completed trials are COMPLETE, failed ones FAIL, as before.
    - An epoch trained again (a resume that skipped a damaged checkpoint and went back to an
      older one, or a driver killed after Optuna was told an epoch Tune's own state lacks)
      replaces the value Optuna holds for its step, as the epoch's second value in the trial's
      MLflow run is the one MLflow shows: Optuna's `Trial.report` would keep the first and warn.
      The replacement goes through the storage's interface (`set_trial_intermediate_value`).
    - Each Optuna trial carries its Tune trial id (user attribute `tune_trial_id`); the study
      driver adds the MLflow run's id and link when the run opens (`tag_optuna_trial`).
    - The Optuna study names its objective (`set_metric_names`), for optuna-dashboard and plots.

    Only public methods are overridden (`suggest`, `on_trial_result`, `on_trial_complete`: Tune's
    searcher interface), and only through `super()`.
    """

    def __init__(self, space, *, time_attr: str, max_t: int, **kwargs) -> None:
        self.define = DefineByRun(space)
        super().__init__(self.define, **kwargs)
        self.time_attr, self.max_t = time_attr, max_t
        self.reported: dict[str, int] = {}  # trial id -> the last step Optuna was told
        storage, name = kwargs.get("storage"), kwargs.get("study_name")
        self.optuna_storage, self.optuna_study_name = storage, name
        self.stored_ids: dict[str, int] = {}  # trial id -> its Optuna trial's id in the storage
        if storage is not None and name is not None and kwargs.get("metric"):
            with warnings.catch_warnings():  # experimental since Optuna 3.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study = optuna.load_study(study_name=name, storage=storage)
                study.set_metric_names([kwargs["metric"]])

    def suggest(self, trial_id: str) -> dict | None:
        self.define.trial_id = trial_id
        try:
            return super().suggest(trial_id)
        finally:
            self.define.trial_id = None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        step = int(result.get(self.time_attr, 0))
        if self.metric not in result or step < 1:
            return
        stored = self.stored_trial(trial_id)
        if stored is not None and step in stored[1].intermediate_values:  # an epoch trained again
            stored_id, trial = stored
            value = float(result[self.metric])
            running = trial.state == optuna.trial.TrialState.RUNNING
            if running and trial.intermediate_values[step] != value:
                self.optuna_storage.set_trial_intermediate_value(stored_id, step, value)
        elif stored is not None or step > self.reported.get(trial_id, 0):
            super().on_trial_result(trial_id, {**result, "training_iteration": step})
        self.reported[trial_id] = max(step, self.reported.get(trial_id, 0))

    def stored_trial(self, trial_id: str) -> tuple[int, optuna.trial.FrozenTrial] | None:
        """The Optuna trial drawn for Tune trial `trial_id` as its storage holds it now, with its
        id there; None without a storage (or for a searcher pickled by an older mg-ray)."""
        storage = getattr(self, "optuna_storage", None)
        if storage is None or not hasattr(self, "stored_ids"):
            return None
        if trial_id not in self.stored_ids:
            found = running_trial_id(storage, self.optuna_study_name, trial_id)
            if found is None:
                return None
            self.stored_ids[trial_id] = found
        return self.stored_ids[trial_id], storage.get_trial(self.stored_ids[trial_id])

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if result and not error:
            self.on_trial_result(trial_id, result)  # the result a stopped trial ended on
            if int(result.get(self.time_attr, 0)) < self.max_t:
                result = None  # PRUNED, with its last intermediate value
        super().on_trial_complete(trial_id, result=result, error=error)


def tag_optuna_trial(
    storage_url: str, study_name: str, tune_trial_id: str, **attrs: str
) -> int | None:
    """Set user attributes on the running Optuna trial drawn for `tune_trial_id`, through the
    storage's public interface, and return its number; None when there is none (a trial drawn
    by an older mg-ray)."""
    storage = optuna.storages.get_storage(storage_url)
    stored_id = running_trial_id(storage, study_name, tune_trial_id)
    if stored_id is None:
        return None
    for key, value in attrs.items():
        storage.set_trial_user_attr(stored_id, key, value)
    return storage.get_trial(stored_id).number


def running_trial_id(storage, study_name: str, tune_trial_id: str) -> int | None:
    """The storage's id of the running Optuna trial drawn for `tune_trial_id`, or None."""
    study_id = storage.get_study_id_from_name(study_name)
    for trial in reversed(storage.get_all_trials(study_id, deepcopy=False)):
        if (
            trial.user_attrs.get(TUNE_TRIAL_ID) == tune_trial_id
            and trial.state == optuna.trial.TrialState.RUNNING
        ):
            return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    return None


def prune_optuna_trials(storage_url: str, study_name: str, tune_trial_ids: list[str]) -> None:
    """Tell Optuna the trials the study's time budget cut are PRUNED, each with the value of its
    last intermediate step (Optuna's rule for a pruned trial told no value): Tune ends a study's
    running trials at its time budget without telling the searcher."""
    if not tune_trial_ids:
        return
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(TUNE_TRIAL_ID) in tune_trial_ids:
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)


def backfill_optuna_trials(
    storage_url: str, study_name: str, histories: dict[str, list[tuple[int, float]]]
) -> None:
    """Give the RUNNING Optuna trials of a study that ended early (interrupted, or cut by its time
    budget) every epoch their MLflow runs hold (`histories`: (epochs completed, value) per Tune
    trial id, `trial_state.RunHistory`). The Train controller logs an epoch into MLflow as soon
    as its checkpoint is recorded, before Tune's report of it reaches the searcher, so such an
    ending can leave Optuna one epoch behind. An interrupted trial's resume reports that epoch
    again, and `StudySearch` keeps the value for its step; a cut one is then pruned with it
    (`prune_optuna_trials`)."""
    storage = optuna.storages.get_storage(storage_url)
    for tune_trial_id, history in histories.items():
        stored_id = running_trial_id(storage, study_name, tune_trial_id)
        if stored_id is None:
            continue
        held = storage.get_trial(stored_id).intermediate_values
        for step, value in history:
            if held.get(step) != value:
                storage.set_trial_intermediate_value(stored_id, step, value)
