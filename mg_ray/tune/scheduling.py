"""How a study's trials end early: ASHA, letting a trial at its last epoch end by itself."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial at its last epoch end by itself instead of stopping it.

    Ray's ASHA answers STOP to every result at `max_t`, although the trial's training ends right
    after that report anyway. Tune would then kill the trial's actor while its Train run is
    finishing: the run would end as killed, not finished, and its workers' CPUs would wait for Ray
    Train's placement-group cleaner instead of being handed back as the run ends. Trials below
    `max_t` are promoted or stopped by ASHA's rungs as before, and a trial at `max_t` is counted
    in its rung when it completes (`on_trial_complete`), as before. Only public methods are
    overridden (`on_trial_result`, Tune's scheduler interface).
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.finish_attr, self.finish_at = time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self.finish_attr, 0) >= self.finish_at:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
