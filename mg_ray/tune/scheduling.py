"""How a study's trials end early: ASHA, letting a trial at its last epoch end by itself, and
remembering on resume what the trials reported before."""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

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
