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
