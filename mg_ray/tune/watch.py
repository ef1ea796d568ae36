"""The study never waits in silence for resources its cluster no longer has.

A trial's workers wait for their placement group as long as a running trial holds the CPUs
(`ray_env.TRIAL`: a standby trial must). That wait is only endless when the cluster itself
shrank below one trial's request: a node was lost and has not come back. `ResourceWatch`, a
Tune `Callback` on the study driver, reads the cluster's resources (`ray.cluster_resources()`,
alive nodes only) every few seconds; while one trial's request does not fit, it says so once,
and if the cluster has not grown back within `study.placement_timeout_s` it ends the study with
one line naming what a trial asks for and what is there. The experiment state is saved on
every step (`ray_env.STUDY_DRIVER`), so the same command resumes the study once the cluster is
back.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.tune import Callback

from mg_ray.cluster import ResourceError, shortfall


class StudyStalled(ResourceError):
    """The cluster stayed too small for one trial for longer than the study allows."""


class ResourceWatch(Callback):
    """request: one trial's (`study.Checked.request`); timeout_s: None waits for ever."""

    def __init__(self, request: dict[str, Any], timeout_s: float | None, every_s: float = 5.0):
        self.request, self.timeout_s, self.every_s = dict(request), timeout_s, every_s
        self.what = self.request.pop("what", "each trial")
        self.checked_at = 0.0
        self.short_since: float | None = None  # when the cluster was first seen too small

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if self.timeout_s is None or now - self.checked_at < self.every_s:
            return
        self.checked_at = now
        self.check(ray.cluster_resources(), now)

    def check(self, total: dict[str, float], now: float) -> None:
        """Raise `StudyStalled` once `total` has been too small for `timeout_s` seconds."""
        short = shortfall(**self.request, total=total, cluster="the cluster")
        if short is None:
            if self.short_since is not None:
                print("the cluster has the resources of a trial again")
                self.short_since = None
            return
        if self.short_since is None:
            self.short_since = now
            print(
                f"warning: {self.what} {short} (a node lost?); waiting up to "
                f"{self.timeout_s:g} s for it to come back (study.placement_timeout_s)"
            )
        elif now - self.short_since >= self.timeout_s:
            raise StudyStalled(
                f"{self.what} {short}, for {now - self.short_since:.0f} s "
                f"(study.placement_timeout_s: {self.timeout_s:g}); the study stops. Run the same "
                "command to resume it once the cluster has the resources."
            )
