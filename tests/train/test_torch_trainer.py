"""`TorchTrainerWithoutRayData`: Ray's `TorchTrainer` less the Ray Data actor of a run without
Ray Datasets (one Python process fewer on the path between two trials)."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback

from mg_ray.train.torch_trainer import TorchTrainerWithoutRayData


def callback_types(trainer_cls, **kwargs) -> list[type]:
    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_only_the_ray_data_callback_is_left_out_and_only_without_datasets():
    plain = callback_types(TorchTrainer)
    assert DatasetsCallback in plain  # what Ray does: a DatasetManager actor per worker group
    assert callback_types(TorchTrainerWithoutRayData) == [t for t in plain if t is not DatasetsCallback]
    # with Ray Datasets it is the plain TorchTrainer
    datasets = {"train": lambda: None}  # a dataset factory: not called before the run starts
    assert callback_types(TorchTrainerWithoutRayData, datasets=datasets) == callback_types(TorchTrainer, datasets=datasets)
