"""Environment settings the project gives Ray and Tune, in one place, each with its reason.

A value the user has set always wins: `apply_defaults()` only fills in what is unset, in the
process named below, before the object that reads it is created.
"""

from __future__ import annotations

import os

# The study driver, before the `Tuner` is created (documented on Ray's "Environment variables
# used by Ray Tune" page).
STUDY_DRIVER: dict[str, tuple[str, str]] = {
    "TUNE_GLOBAL_CHECKPOINT_S": (
        "0",
        (
            "save the experiment state on every step (Tune's default: every 10+ s). A study driver "
            "killed between two saves forgets the trials that started since, and the resumed study "
            "runs their slots again; the state of a study of tens of trials is a few kB."
        ),
    ),
}

# Each trial's function, before its `TorchTrainer` runs (Ray Train hands RAY_TRAIN_* settings of
# that process on to the run's controller).
TRIAL: dict[str, tuple[str, str]] = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": (
        "86400",
        (
            "a standby trial (`study.standby_trials`) waits for the running trials' CPUs as long as "
            "one of them trains; with Ray Train's default of 60 s it logs a startup-timeout error "
            "every minute meanwhile (the error itself names this variable as the way to raise it). "
            "Requests no cluster can ever place are refused before the study starts, and a "
            "cluster that shrinks below one trial (a node lost) ends the study after "
            "`study.placement_timeout_s` (`mg_ray.tune.watch`)."
        ),
    ),
}


# Every Train run, in the process that calls `TorchTrainer.fit()` (a trial's function, or the
# `mg-ray train` driver), before it does: Ray Train hands these on to the run's controller.
TRAIN_RUN: dict[str, tuple[str, str]] = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": (
        "0.2",
        (
            "how often the Train controller polls its workers (Ray Train's default: 2 s). A "
            "worker's `ray.train.report` waits for that poll and the controller handles a report "
            "only then, so the default adds up to 2 s to every epoch and several to a run's end, "
            "more than short epochs train (`benchmarks/bench_train_env.py` measures both "
            "settings side by side). A poll is one small call per worker. Ray Train reads the "
            "variable from the environment and forwards it to the controller (its constants' "
            "environment-variable section); its docs do not list it: without it, runs are only "
            "slower."
        ),
    ),
}


# The process that starts a private local cluster (`mg_ray.cluster.init_ray` without an address),
# before it does: the cluster's processes (trial actors, Train controllers) inherit them. (There
# `init_ray` also sets RAY_API_SERVER_ADDRESS, to the cluster's own dashboard: a value it
# computes, and one no user setting may replace; its reason is written there.)
LOCAL_CLUSTER: dict[str, tuple[str, str]] = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": (
        "0",
        (
            "Ray Train starts one more actor process per worker group to watch for node drains "
            "(a spot instance's reclaim), for `ray.train.get_preemption_info`, which mg-ray's "
            "loop does not call. A private local cluster is one node that nothing drains; "
            "without the watcher a short run trains faster "
            "(`benchmarks/bench_train_env.py --compare preemption-watcher`). A node lost "
            "without a drain is a worker-group failure either way (`resources.max_failures`). "
            "Like the poll interval, a variable Ray Train reads and forwards to its controller "
            "(its constants' environment-variable section), not listed in its docs. Clusters "
            "joined with an address keep Ray's default."
        ),
    ),
}


def apply_defaults(settings: dict[str, tuple[str, str]]) -> None:
    for name, (value, _why) in settings.items():
        os.environ.setdefault(name, value)
