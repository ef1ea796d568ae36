"""`MgRayTorchTrainer`: Ray's `TorchTrainer` less the Ray Data actor of a run without Ray
Datasets (one Python process fewer on the path between two trials), and, with `should_abort`, a
run whose controller runs in the calling actor and stops when `should_abort()` says so."""

from __future__ import annotations

import hashlib
import inspect
import time

import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller import TrainController

from mg_ray.train.torch_trainer import MgRayTorchTrainer, TrainRunAborted
from tests.conftest import wait_for_free_cpus


def callback_types(trainer_cls, should_abort=None, **kwargs) -> list[type]:
    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    trainer.should_abort = should_abort
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_only_the_ray_data_callback_is_left_out_and_only_without_datasets():
    plain = callback_types(TorchTrainer)
    assert DatasetsCallback in plain  # what Ray does: a DatasetManager actor per worker group
    assert callback_types(MgRayTorchTrainer) == [t for t in plain if t is not DatasetsCallback]
    # with Ray Datasets it is the plain TorchTrainer
    datasets = {"train": lambda: None}  # a dataset factory: not called before the run starts
    assert callback_types(MgRayTorchTrainer, datasets=datasets) == callback_types(TorchTrainer, datasets=datasets)


def test_a_run_controlled_in_the_calling_actor_has_no_placement_group_cleaner():
    assert PlacementGroupCleanerCallback in callback_types(MgRayTorchTrainer)
    in_actor = callback_types(MgRayTorchTrainer, should_abort=lambda: False)
    assert in_actor == [t for t in callback_types(MgRayTorchTrainer) if t is not PlacementGroupCleanerCallback]


def test_the_copied_controller_abort_is_still_rays():
    """`torch_trainer.abort` is Ray 2.60's `TrainController.abort` less `exit_actor()`: when a
    Ray upgrade changes the original, this fails, and the copy must be brought in line."""
    source = inspect.getsource(TrainController.abort)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "811b5b0144f81e43", source


def _train_until_aborted(config):
    from pathlib import Path

    Path(config["marker"]).touch()  # the workers are up and training
    while True:
        time.sleep(0.05)


def _run_in_actor(storage: str, marker: str, abort_after_s: float | None = None) -> str:
    """Runs an `MgRayTorchTrainer` of 2 workers x 0.5 CPU in an actor (a Tune trial's driver,
    say); aborts when the workers have written `marker`, or `abort_after_s` after the start."""
    import ray

    @ray.remote(num_cpus=0)
    class Trial:
        def fit(self) -> str:
            from pathlib import Path

            trainer = MgRayTorchTrainer(
                _train_until_aborted,
                train_loop_config={"marker": marker},
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                run_config=RunConfig(name="aborted", storage_path=storage),
            )
            started = time.monotonic()
            trainer.should_abort = lambda: (Path(marker).exists() if abort_after_s is None
                                            else time.monotonic() - started > abort_after_s)
            try:
                trainer.fit()
            except TrainRunAborted as err:
                return str(err)
            return "finished"

    trial = Trial.remote()
    try:
        return ray.get(trial.fit.remote(), timeout=120)
    finally:
        ray.kill(trial)


@pytest.mark.slow
def test_should_abort_shuts_the_workers_down_and_frees_their_cpus(ray_cluster, tmp_path):
    import ray

    started = time.monotonic()
    assert "aborted" in _run_in_actor(str(tmp_path / "runs"), str(tmp_path / "training"))
    took = time.monotonic() - started
    assert (tmp_path / "training").exists()
    # The workers' CPUs are free again: the placement group is gone, not left to the end of
    # the job (a group created by an actor lives as long as the actor and its job).
    assert wait_for_free_cpus(2, timeout_s=1) == 2, (ray.available_resources(), took)


@pytest.mark.slow
def test_a_run_waiting_for_cpus_is_aborted_at_once(ray_cluster, tmp_path):
    """A standby trial's run waits for the running trial's CPUs; aborted then, it ends within
    a second or so, and leaves no group behind to take the CPUs later."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    blocker = placement_group([{"CPU": 1.5}])  # the running trial's workers, say
    ray.get(blocker.ready())
    try:
        started = time.monotonic()
        outcome = _run_in_actor(str(tmp_path / "runs"), str(tmp_path / "training"), abort_after_s=3)
        took = time.monotonic() - started
    finally:
        remove_placement_group(blocker)
    assert "aborted before it started" in outcome
    assert took < 10, took
    assert not (tmp_path / "training").exists()
    assert wait_for_free_cpus(2) == 2, ray.available_resources()


@pytest.mark.slow
def test_should_abort_needs_an_actor(ray_cluster):
    trainer = MgRayTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    trainer.should_abort = lambda: False
    with pytest.raises(RuntimeError, match="must be a Ray actor"):
        trainer._initialize_and_run_controller()
