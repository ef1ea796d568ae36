"""How trials end early: `FinishingASHA`."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from mg_ray.tune.scheduling import FinishingASHA


def test_asha_stops_at_its_rungs_but_lets_a_trial_at_its_last_epoch_end_by_itself():
    def decisions(scheduler) -> list[str]:
        trials = {name: SimpleNamespace(trial_id=name) for name in "abc"}
        for trial in trials.values():
            scheduler.on_trial_add(None, trial)
        results = [("a", 2, 0.9), ("b", 2, 0.1), ("c", 2, 0.95), ("a", 4, 0.2), ("c", 4, 0.99)]
        return [
            scheduler.on_trial_result(
                None, trials[name], {"epochs_completed": epochs, "val_top1": top1}
            )
            for name, epochs, top1 in results
        ]

    settings = dict(
        time_attr="epochs_completed",
        metric="val_top1",
        mode="max",
        max_t=4,
        grace_period=2,
        reduction_factor=2,
    )
    stop, go = TrialScheduler.STOP, TrialScheduler.CONTINUE
    # the rung at epoch 2 stops "b" (below the median) in both; Ray's ASHA also stops every trial
    # that reports its last epoch, which ends there anyway
    assert decisions(ASHAScheduler(**settings)) == [go, stop, go, stop, stop]
    assert decisions(FinishingASHA(**settings)) == [go, stop, go, go, go]


def test_a_resumed_asha_stops_the_trials_an_uninterrupted_one_stops():
    """Tune restores a study without its scheduler's rungs. Six trials, the study killed after
    the first three reported: the new scheduler, given what they reported before (`history`),
    decides on the last three as the uninterrupted one does; without it, it lets them through."""
    settings = dict(
        time_attr="epochs_completed",
        metric="val_top1",
        mode="max",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
    )
    # (trial, its val_top1 at epochs 1..4); the first three finished or were stopped before the
    # kill, the last three run after it
    scores = {
        "t1": [0.5, 0.6, 0.7, 0.8],
        "t2": [0.4, 0.5, 0.6, 0.7],
        "t3": [0.6, 0.3, 0.2, 0.1],
        "t4": [0.1, 0.2, 0.3, 0.4],
        "t5": [0.55, 0.65, 0.75, 0.85],
        "t6": [0.45, 0.35, 0.3, 0.2],
    }

    def run(scheduler, names, reported):
        """Each trial in turn until ASHA stops it or it completes; returns its epochs."""
        ran = {}
        for name in names:
            trial = SimpleNamespace(trial_id=name, status="RUNNING")
            scheduler.on_trial_add(None, trial)
            for epochs, value in enumerate(scores[name], start=1):
                result = {"epochs_completed": epochs, "val_top1": value}
                reported.setdefault(name, []).append((epochs, value))
                if epochs == 4:
                    scheduler.on_trial_complete(None, trial, result)
                elif scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                    scheduler.on_trial_remove(None, trial)
                    break
            ran[name] = epochs
        return ran

    straight = run(FinishingASHA(**settings), list(scores), {})

    reported: dict[str, list] = {}
    before = run(FinishingASHA(**settings), ["t1", "t2", "t3"], reported)
    resumed = FinishingASHA(**settings, history=lambda trial_id: reported.get(trial_id, []))
    for name in ("t1", "t2", "t3"):  # what Tune does with the restored, finished trials
        resumed.on_trial_add(None, SimpleNamespace(trial_id=name, status="TERMINATED"))
    after = run(resumed, ["t4", "t5", "t6"], reported)
    assert {**before, **after} == straight
    assert straight["t4"] < 4 and straight["t6"] < 4  # the check has something to find

    forgetful = FinishingASHA(**settings)
    assert run(forgetful, ["t4", "t5", "t6"], {})["t4"] == 4  # empty rungs prune nothing


def study_search(url: str, max_t: int):
    """The study's searcher over one parameter, on the Optuna storage at `url` (study "s")."""
    import optuna

    from mg_ray.tune.scheduling import StudySearch
    from mg_ray.tune.space import Parameter, SearchSpace

    space = SearchSpace(parameters={"optim.lr": Parameter("float", low=0.001, high=0.1, log=True)})
    return StudySearch(
        space.sample,
        time_attr="epochs_completed",
        max_t=max_t,
        metric="best_val_top1",
        mode="max",
        storage=optuna.storages.RDBStorage(url),
        study_name="s",
        seed=0,
    )


def result(epochs: int, score: float) -> dict:
    """A trial's result as the loop reports it (Tune's own iteration count restarts at 1)."""
    return {"epochs_completed": epochs, "best_val_top1": score, "training_iteration": 1}


def test_optuna_is_told_what_tune_did_with_each_trial(tmp_path):
    """Through Tune's searcher interface, on a real sqlite Optuna storage: every epoch is an
    intermediate value (the one ASHA stopped on included), a trial stopped before its last epoch
    is PRUNED with its last value, a completed one COMPLETE, a failed one FAIL; each carries its
    Tune trial id, the driver adds its MLflow run, and the objective is named."""
    import optuna

    from mg_ray.tune.scheduling import prune_optuna_trials, tag_optuna_trial

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = study_search(url, max_t=3)
    for trial_id in ("done", "stopped", "failed", "cut"):
        assert set(search.suggest(trial_id)) == {"optim.lr"}

    assert tag_optuna_trial(url, "s", "done", mlflow_run_id="abc") == 0  # its number, at start
    for epochs, score in ((1, 0.3), (2, 0.5), (3, 0.5)):
        search.on_trial_result("done", result(epochs, score))
    search.on_trial_complete("done", result(3, 0.5))
    search.on_trial_result("stopped", result(1, 0.2))
    search.on_trial_complete("stopped", result(2, 0.25))  # ASHA stopped it on this result
    search.on_trial_result("failed", result(1, 0.1))
    search.on_trial_complete("failed", error=True)
    search.on_trial_result("cut", result(1, 0.4))
    assert tag_optuna_trial(url, "s", "unknown", mlflow_run_id="x") is None
    prune_optuna_trials(url, "s", ["cut"])  # the time budget ended it

    study = optuna.load_study(study_name="s", storage=url)
    assert study.metric_names == ["best_val_top1"]
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    states = {k: t.state.name for k, t in by_id.items()}
    assert states == {"done": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL", "cut": "PRUNED"}
    assert by_id["done"].intermediate_values == {1: 0.3, 2: 0.5, 3: 0.5}
    assert by_id["done"].value == 0.5 and by_id["done"].user_attrs["mlflow_run_id"] == "abc"
    assert by_id["stopped"].intermediate_values == {1: 0.2, 2: 0.25}
    assert by_id["stopped"].value == 0.25  # its last value, as Optuna gives a pruned trial
    assert by_id["cut"].value == 0.4 and study.best_trial.user_attrs["tune_trial_id"] == "done"


def test_an_epoch_trained_again_replaces_its_value_in_optuna(tmp_path):
    """A resume that skipped a damaged checkpoint trains epochs 2 and 3 again; their new values
    replace the first ones in Optuna, as in the trial's MLflow run (its latest value at a step is
    the one MLflow shows). Also when the searcher restored is older than the storage (the driver
    was killed after Optuna was told epoch 3): Optuna's `Trial.report` would keep the first
    value. Real sqlite storage, Tune's searcher save/restore."""
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = study_search(url, max_t=4)
    search.suggest("t")
    search.on_trial_result("t", result(1, 0.1))
    search.on_trial_result("t", result(2, 0.2))
    saved = tmp_path / "searcher.pkl"
    search.save(str(saved))  # Tune's last snapshot of the searcher: epochs 1-2
    search.on_trial_result("t", result(3, 0.3))  # told to Optuna, then the driver is killed

    resumed = study_search(url, max_t=4)
    resumed.restore(str(saved))
    # the resume goes back to the checkpoint of epoch 1: epochs 2 and 3 are trained again
    for epochs, score in ((2, 0.25), (3, 0.35), (3, 0.35), (4, 0.4)):
        resumed.on_trial_result("t", result(epochs, score))
    resumed.on_trial_complete("t", result(4, 0.4))

    [trial] = optuna.load_study(study_name="s", storage=url).trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.4
    assert trial.intermediate_values == {1: 0.1, 2: 0.25, 3: 0.35, 4: 0.4}
