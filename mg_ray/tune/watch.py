"""The study stops, resumable, with one line, rather than wait in silence or fill a disk.

Resources:

A trial's workers wait for their placement group as long as a running trial holds the CPUs
(`ray_env.TRIAL`: a standby trial must). That wait is only endless when the cluster itself
shrank below one trial's request: a node was lost and has not come back. `ResourceWatch`, a
Tune `Callback` on the study driver, reads the cluster's resources (`ray.cluster_resources()`,
alive nodes only) and each alive node's (a worker is placed whole on one node) every few
seconds; while one trial's request does not fit, it says so once, and if the cluster has not
grown back within `study.placement_timeout_s` it ends the study with one line naming what a
trial asks for and what is there. The experiment state is saved on
every step (`ray_env.STUDY_DRIVER`), so the same command resumes the study once the cluster is
back.

Disk: `DiskWatch` reads the free space of the study's local stores (checkpoints, the MLflow
store and its artifacts, the Optuna storage) as often, and stops the study the same way once one
has less than `study.min_free_disk_mb`: before a checkpoint or a database write fails halfway,
which would fail trials that only lacked space. The checkpoints' folder must also hold the next
checkpoint: `study.min_free_disk_mb` plus the largest checkpoint of the study so far, or before
the first, the size the study's model gives (`mg_ray.train.checkpoint.checkpoint_mb`; a
paper-size checkpoint, weights, best weights and SGD momentum, is about 440 MB: several times
the default margin). A trial that fails (and would be retried) has the disk checked at once, so
one that failed for lack of space stops the study, resumable, rather than retry into the same
full disk.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import ray
from ray.tune import Callback

from mg_ray import paths
from mg_ray.cluster import ResourceError, node_resources, shortfall


class StudyStopped(ResourceError):
    """The study stopped for a resource it lacks; its trials resume with the same command."""


class StudyStalled(StudyStopped):
    """The cluster stayed too small for one trial for longer than the study allows."""


class DiskFull(StudyStopped):
    """A local store of the study is (nearly) out of space."""


class Watch(Callback):
    """A check of the study's surroundings, run on the driver every `every_s` seconds of Tune's
    loop (`on_step_end`); `poll` raises a `StudyStopped` to stop the study."""

    every_s = 5.0
    checked_at = 0.0

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self.checked_at >= self.every_s:
            self.checked_at = now
            self.poll(now)

    def poll(self, now: float) -> None:
        raise NotImplementedError


class ResourceWatch(Watch):
    """request: one trial's (`study.Checked.request`); timeout_s: None waits for ever."""

    def __init__(self, request: dict[str, Any], timeout_s: float | None):
        self.request, self.timeout_s = dict(request), timeout_s
        self.what = self.request.pop("what", "each trial")
        self.short_since: float | None = None  # when the cluster was first seen too small

    def poll(self, now: float) -> None:
        if self.timeout_s is not None:
            self.check(ray.cluster_resources(), now, node_resources())

    def check(
        self, total: dict[str, float], now: float, nodes: list[dict[str, float]] | None = None
    ) -> None:
        """Raise `StudyStalled` once `total` (or the `nodes`' shapes) has been too small for
        `timeout_s` seconds."""
        short = shortfall(**self.request, total=total, nodes=nodes, cluster="the cluster")
        if short is None:
            if self.short_since is not None:
                print("the cluster has the resources of a trial again")
                self.short_since = None
            return
        _resource, short = short
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


class DiskWatch(Watch):
    """paths: local folders the study writes to (`local_folder` of its stores' URIs);
    checkpoints: the one of them that holds the trials' Train runs and their checkpoints, which
    must also have room for one more checkpoint: the largest seen so far, or before any,
    `expected_checkpoint_mb` (`mg_ray.train.checkpoint.checkpoint_mb` of the study's model)."""

    def __init__(
        self,
        paths: list[Path],
        min_free_mb: float,
        checkpoints: Path | None = None,
        expected_checkpoint_mb: float = 0.0,
    ):
        self.paths, self.min_free_mb, self.checkpoints = paths, min_free_mb, checkpoints
        self.expected_mb = expected_checkpoint_mb
        self.largest_mb = 0.0  # the largest checkpoint seen (kept after Ray deletes it)

    def poll(self, now: float) -> None:
        self.check()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        """A trial failed and Tune is about to start it again: if it failed for lack of space,
        stop the study now (the trial resumes with the same command) rather than retry it into
        the same full disk. (Not on `on_trial_error`: that trial has failed for good in Tune and
        Optuna, and stays failed.)"""
        self.check()

    def check(self) -> None:
        if not self.min_free_mb:  # study.min_free_disk_mb: 0 turns the watch off
            return
        if self.checkpoints is not None:
            self.largest_mb = max(self.largest_mb, largest_checkpoint_mb(self.checkpoints))
        if self.largest_mb:
            next_checkpoint, which = self.largest_mb, "the largest checkpoint so far"
        else:
            next_checkpoint, which = self.expected_mb, "a checkpoint of the study's model"
        for path in self.paths:
            free_mb = shutil.disk_usage(existing(path)).free / 2**20
            needed = next_checkpoint if path == self.checkpoints else 0.0
            if free_mb < self.min_free_mb + needed:
                needs = f"study.min_free_disk_mb ({self.min_free_mb:g})"
                if needed:
                    needs += f" plus {which} ({needed:.0f} MB)"
                raise DiskFull(
                    f"{path}: {free_mb:.0f} MB free, under {needs}; the study stops. Free some "
                    "space and run the same command to resume it."
                )


def largest_checkpoint_mb(train_runs: Path) -> float:
    """The size of the largest `checkpoint_*` folder of the Train runs under `train_runs`, in MB
    (a folder being written counts what it has so far)."""
    largest = 0
    for folder in train_runs.glob("*/checkpoint_*"):
        try:
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        except OSError:  # Ray deleted it meanwhile
            continue
        largest = max(largest, size)
    return largest / 2**20


def local_folder(uri: str) -> Path | None:
    """The local folder behind a store's URI (a path, file:, sqlite:), or None (a server)."""
    sqlite = paths.sqlite_file(uri)
    if sqlite is not None:
        return sqlite.parent
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme:
        return Path(uri)
    return None


def existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (a store not yet written)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
