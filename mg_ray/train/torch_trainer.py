"""The `TorchTrainer` every training run uses: Ray's, less one process per run it does not need."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class TorchTrainerWithoutRayData(TorchTrainer):
    """A `TorchTrainer` that starts no Ray Data actor for a run without Ray Datasets.

    Ray Train V2 gives every run a `DatasetsCallback`, which starts a `DatasetManager` actor
    whenever a worker group starts, datasets or not: one more Python process importing Ray Data
    (about 1.5 CPU-seconds here), started while the two workers start, on the path from one
    trial's end to the next one's first batch. Our workers read their clips themselves
    (`mg_ray.data`) and pass no `datasets`, so the callback is left out; with datasets this is
    the plain `TorchTrainer`.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
