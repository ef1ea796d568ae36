"""Trial launches held apart, so a standby trial does not start up on the critical path."""

from __future__ import annotations

import time

from ray.tune.search import ConcurrencyLimiter


class StaggeredLimiter(ConcurrencyLimiter):
    """A `ConcurrencyLimiter` that also holds a new trial back for `stagger_s` seconds after a
    trial started or ended, while another trial is live (see `StudySettings.trial_stagger_s`).

    Tune asks the searcher again on its next step, so a held trial starts within a step of the
    hold's end. The hold is wall-clock time, as the searcher's state is saved with the experiment
    and may be restored in another process; a restored hold never exceeds `stagger_s`.
    """

    def __init__(self, searcher, max_concurrent: int, stagger_s: float) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.stagger_s = stagger_s
        self.hold_until = 0.0

    def suggest(self, trial_id: str):
        now = time.time()
        if self.live_trials and now < self.hold_until <= now + self.stagger_s:
            return None
        suggestion = super().suggest(trial_id)
        if trial_id in self.live_trials:  # a trial was launched
            self.hold_until = now + self.stagger_s
        return suggestion

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        super().on_trial_complete(trial_id, result=result, error=error)
        self.hold_until = time.time() + self.stagger_s
