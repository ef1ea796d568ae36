"""The `TorchTrainer` every training run uses: Ray's, with two changes for runs inside a study."""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.constants import (
    DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
    get_env_vars_to_propagate,
)
from ray.train.v2._internal.execution.controller import TrainController

ABORT_POLL_S = 0.2
# A controller blocked in a wait cannot run abort(): its worker group waiting for a placement
# group, or Tune's report callback waiting on a full queue that nothing empties once Tune has
# stopped the trial. After this long it is killed instead. Ray Train's placement-group cleaner
# frees the workers' CPUs of a group it was told about (once the workers started); a study
# removes the others (`mg_ray.tune.trial_abort.remove_orphaned_placement_groups`).
ABORT_TIMEOUT_S = 10.0


class TrainRunAborted(RuntimeError):
    """The Train run was aborted because its `should_abort` said so."""


class MgRayTorchTrainer(TorchTrainer):
    """Ray's `TorchTrainer`, less one process per run, and abortable from another thread.

    - **No Ray Data actor without Ray Datasets.** Ray Train V2 gives every run a
      `DatasetsCallback`, which starts a `DatasetManager` actor whenever a worker group starts,
      datasets or not: one more Python process importing Ray Data (about 1.5 CPU-seconds here),
      started while the two workers start, on the path from one trial's end to the next one's
      first batch. Our workers read their clips themselves (`mg_ray.data`) and pass no
      `datasets`, so the callback is left out; with datasets it stays.
    - **`should_abort`.** `fit()` calls it every 0.2 s while the run goes on. Once it returns
      True, `fit()` asks the run's controller to abort, which is Ray Train's graceful abort (the
      one Ctrl-C triggers in a main thread): the workers are shut down, the placement group is
      removed, the controller exits. Then `fit()` raises `TrainRunAborted`. A Tune trial needs
      this: its `fit()` runs in a thread that no Ctrl-C reaches.
    """

    should_abort: Callable[[], bool] | None = None

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.should_abort is None:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        # Ray 2.60's method (tests/train/test_torch_trainer.py fails when it changes), except for
        # the wait for the run, which watches should_abort. No SIGINT handler: not a main thread.
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
        controller_cls = ray.remote(
            num_cpus=0,
            label_selector={ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()},
            runtime_env={"env_vars": env_vars},
        )(TrainController)
        controller = controller_cls.remote(**controller_init_kwargs)
        run = controller.run.remote()
        while not ray.wait([run], timeout=ABORT_POLL_S)[0]:
            if self.should_abort():
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
                except ray.exceptions.RayActorError:
                    pass  # abort() ends with the controller exiting
                except ray.exceptions.GetTimeoutError:
                    ray.kill(controller)
                raise TrainRunAborted(f"Train run {self.run_config.name!r} aborted")
        ray.get(run)
        return ray.get(controller.get_result.remote())
