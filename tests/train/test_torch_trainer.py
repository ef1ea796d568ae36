"""`MgRayTorchTrainer`: Ray's `TorchTrainer` less the Ray Data actor of a run without Ray
Datasets (one Python process fewer on the path between two trials), and abortable from the thread
that runs `fit()` (a Tune trial's, which no Ctrl-C reaches)."""

from __future__ import annotations

import hashlib
import inspect
import time

import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from mg_ray.train.torch_trainer import MgRayTorchTrainer, TrainRunAborted
from tests.conftest import wait_for_free_cpus


def callback_types(trainer_cls, **kwargs) -> list[type]:
    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_only_the_ray_data_callback_is_left_out_and_only_without_datasets():
    plain = callback_types(TorchTrainer)
    assert DatasetsCallback in plain  # what Ray does: a DatasetManager actor per worker group
    assert callback_types(MgRayTorchTrainer) == [t for t in plain if t is not DatasetsCallback]
    # with Ray Datasets it is the plain TorchTrainer
    datasets = {"train": lambda: None}  # a dataset factory: not called before the run starts
    assert callback_types(MgRayTorchTrainer, datasets=datasets) == callback_types(TorchTrainer, datasets=datasets)


def test_the_copied_controller_start_is_still_rays():
    """`_initialize_and_run_controller` with `should_abort` is a copy of Ray 2.60's: when a Ray
    upgrade changes the original, this fails, and the copy must be brought in line."""
    source = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "ea57ec4498323973", source


def _train_until_aborted(config):
    from pathlib import Path

    Path(config["marker"]).touch()  # the workers are up and training
    while True:
        time.sleep(0.05)


@pytest.mark.slow
def test_should_abort_shuts_the_workers_down_and_frees_their_cpus(ray_cluster, tmp_path):
    import ray

    marker = tmp_path / "training"
    trainer = MgRayTorchTrainer(
        _train_until_aborted,
        train_loop_config={"marker": str(marker)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="aborted", storage_path=str(tmp_path / "runs")),
    )
    trainer.should_abort = marker.exists
    started = time.monotonic()
    with pytest.raises(TrainRunAborted, match="aborted"):
        trainer.fit()
    took = time.monotonic() - started
    # The workers' CPUs are free again: the placement group is gone, not left to the end of
    # the job (a group created by a controller lives as long as the driver).
    assert wait_for_free_cpus(2) == 2, (ray.available_resources(), took)
