"""When trials start and how they end: the study's searcher limiter and its ASHA scheduler."""

from __future__ import annotations

import time

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter


class StaggeredLimiter(ConcurrencyLimiter):
    """A `ConcurrencyLimiter` that also holds a new trial back while another trial is live:
    for `stagger_s` seconds after a trial ended or started, and for twice that after a trial
    started with nothing else live (see `StudySettings.trial_stagger_s`).

    `stagger_s` is about the time a trial whose driver and Train controller are up needs to get
    its workers training: what the standby trial does when a trial ends. A trial started cold
    also has its driver and controller to start first, hence twice that.

    Tune asks the searcher again on its next step, so a held trial starts within a step of the
    hold's end. The hold is wall-clock time, as the searcher's state is saved with the experiment
    and may be restored in another process; a restored hold never exceeds twice `stagger_s`.
    """

    def __init__(self, searcher, max_concurrent: int, stagger_s: float) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.stagger_s = stagger_s
        self.hold_until = 0.0

    def suggest(self, trial_id: str):
        now = time.time()
        if self.live_trials and now < self.hold_until <= now + 2 * self.stagger_s:
            return None
        cold = not self.live_trials
        suggestion = super().suggest(trial_id)
        if trial_id in self.live_trials:  # a trial was launched
            self.hold_until = now + (2 if cold else 1) * self.stagger_s
        return suggestion

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        self.hold_until = time.time() + self.stagger_s


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial at its last epoch end by itself instead of stopping it.

    Ray's ASHA answers STOP to every result at `max_t`, although the trial's training ends right
    after that report anyway. Tune then ends the trial at once and removes (or hands over) its
    actor, racing the Train controller's own clean shutdown: with the actor killed midway, the
    workers' placement group was freed only when Ray Train's placement-group cleaner next
    looked, and once a dying controller started a new worker group whose placement group nothing
    removed, so the study waited forever. (Trials stopped below `max_t` have their Train runs
    aborted first: `mg_ray.tune.trial_abort`.)
    Trials below `max_t` are promoted or stopped by ASHA's rungs as before, and a trial at
    `max_t` is counted in its rung when it completes (`on_trial_complete`), as before.
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.finish_attr, self.finish_at = time_attr, max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self.finish_attr, 0) >= self.finish_at:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
