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
