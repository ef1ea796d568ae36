"""How a study stops a trial's Train run, on a real local Ray cluster with real Tune trials.

A study reuses trial actors (`reuse_actors`): a stopped trial's actor goes to the next trial once
its function has returned. `trial_driver` aborts its Train run when the study driver asks it to
(`abort_and_wait`, through a key in Ray's key-value store) or when Tune's session says stop
(`tune_stop_event`, a private part of Ray 2.60 that these tests pin down). Its Train run reports
to Tune from a thread (`TuneReporter`).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mg_ray.tune.trial_abort import (
    abort_and_wait,
    abort_requested,
    mark_ended,
    mark_running,
    tune_stop_event,
)
from tests.conftest import wait_for_free_cpus

pytestmark = pytest.mark.slow


def test_abort_and_wait_waits_for_the_trial_to_end_its_run(ray_cluster):
    # a run that has ended (or never started) needs no abort
    assert abort_and_wait("study_gone", timeout_s=5) == 0.0
    # a trial driver that polls and ends its run a little after the request
    mark_running("study_a")
    mark_running("study_b")

    def trial_driver():
        while not abort_requested("study_a"):
            time.sleep(0.05)
        time.sleep(0.3)
        mark_ended("study_a")

    thread = threading.Thread(target=trial_driver)
    thread.start()
    took = abort_and_wait("study_a", timeout_s=10)
    thread.join()
    assert took is not None and 0.3 <= took < 5
    assert not abort_requested("study_b")  # the other run was not asked
    # a trial driver that never answers: the request is withdrawn after the timeout
    assert abort_and_wait("study_b", timeout_s=0.5) is None
    assert not abort_requested("study_b")


def _reports_then_waits_for_stop(config):
    """A trial that reports the way a study's Train run does (`TuneReporter`: a queue in the
    trial's process that Tune's session polls) and then, like a Train run that is still
    training, does not return until Tune's stop event is set."""
    from mg_ray.tune.trial_report import TuneReporter

    stop = tune_stop_event()
    TuneReporter().after_report(None, [{"score": 1, "pid": os.getpid()}], checkpoint=None)
    seen = stop.wait(60)
    Path(config["folder"], f"{config['trial']}.stopped").write_text(str(seen))


def test_a_stopped_trial_hands_its_actor_to_the_next_trial(ray_cluster, tmp_path):
    from ray import tune

    tuner = tune.Tuner(
        _reports_then_waits_for_stop,
        param_space={"trial": tune.grid_search([0, 1, 2]), "folder": str(tmp_path)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), stop={"training_iteration": 1},
                                  verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    # All trials ran in one actor. Trials 0 and 1 returned when the next trial took the actor
    # over, which set the stop event. (Trial 2's actor is removed at the end; its process may
    # exit before the function gets to write.)
    assert len({r.metrics["pid"] for r in results}) == 1
    assert [(tmp_path / f"{trial}.stopped").read_text() for trial in (0, 1)] == ["True", "True"]


def _sleep_forever(config):
    time.sleep(3600)


def test_the_placement_group_of_a_killed_trial_is_removed(ray_cluster, tmp_path):
    """A trial's actor is its Train run's controller (`MgRayTorchTrainer` with `should_abort`).
    Killed while its run waits for CPUs (Tune removes a trial's actor when the trial's function
    does not return), it leaves a pending placement group that would take the CPUs once they
    free up, for as long as the study runs. The study driver removes it."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.util.placement_group import placement_group, remove_placement_group

    from mg_ray.train.torch_trainer import MgRayTorchTrainer
    from mg_ray.tune.trial_abort import remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Trial:
        def fit(self) -> None:
            trainer = MgRayTorchTrainer(
                _sleep_forever,
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                run_config=RunConfig(name="waiting", storage_path=str(tmp_path)),
            )
            trainer.should_abort = lambda: False
            trainer.fit()

    blocker = placement_group([{"CPU": 1.5}])  # the running trial's workers, say
    ray.get(blocker.ready())
    trial = Trial.remote()
    trial.fit.remote()
    time.sleep(5)  # the run waits for its CPUs by then
    ray.kill(trial)
    remove_placement_group(blocker)
    # The driver's own group (the blocker) is not the function's business; the dead trial's
    # pending group is, once the GCS knows the trial's actor is dead.
    deadline, removed = time.monotonic() + 20, []
    while not removed and time.monotonic() < deadline:
        removed = remove_orphaned_placement_groups()
        time.sleep(0.2)
    assert len(removed) == 1, removed
    assert wait_for_free_cpus(2) == 2, ray.available_resources()
    assert remove_orphaned_placement_groups() == []
