"""The `TorchTrainer` every training run uses: Ray's, with two changes for runs inside a study."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.controller.state import AbortedState

logger = logging.getLogger(__name__)

ABORT_POLL_S = 0.2
# How often the wait for the workers' CPUs checks `should_abort`. `PlacementGroup.wait` takes
# whole seconds (Ray 2.60 truncates 0.2 to 0, which returns at once: a busy loop).
RESOURCES_POLL_S = 1


class TrainRunAborted(RuntimeError):
    """The Train run was aborted because its `should_abort` said so."""


class MgRayTorchTrainer(TorchTrainer):
    """Ray's `TorchTrainer`, less the processes a run does not need, and abortable.

    - **No Ray Data actor without Ray Datasets.** Ray Train V2 gives every run a
      `DatasetsCallback`, which starts a `DatasetManager` actor whenever a worker group starts,
      datasets or not: one more Python process importing Ray Data (about 1.5 CPU-seconds here),
      started while the two workers start. Our workers read their clips themselves
      (`mg_ray.data`) and pass no `datasets`, so the callback is left out; with datasets it stays.
    - **`should_abort`: the run's controller runs in the calling actor.** Ray starts a Train
      controller actor for every run: a Python process that imports Ray Train, torch and MLflow
      (for `mg_ray.train.outbox`'s logging) and Tune's report queue, about 10 CPU-seconds a run on
      this machine. A study's trial driver is a reused Tune actor that has all of that imported
      already, so with `should_abort` set, `fit()` runs Ray's `TrainController` right here, in
      its thread's own event loop, and watches `should_abort()` every 0.2 s beside it. Once it
      returns True, the run is aborted the way the controller's own `abort()` does it (the one
      Ctrl-C triggers): workers shut down, placement group removed. Then `fit()` raises
      `TrainRunAborted`.

      Before the run starts, if the workers' CPUs are taken, `fit()` waits until the cluster
      can place them, in a placement group of its own that it polls every second: a standby
      trial waiting for the running trial's CPUs can be aborted then (inside the controller,
      that wait blocks its event loop).

      The calling actor is the run's controller for Ray Train: workers, Ray's state API and
      placement groups know it by its id. Its groups are removed when the actor dies, by the
      study driver (`mg_ray.tune.trial_abort.remove_orphaned_placement_groups`) or with the
      job, so Ray Train's placement-group cleaner (one more actor per run, started for a
      controller that may die on its own) is left out.
    """

    should_abort: Callable[[], bool] | None = None

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
        if self.should_abort is not None:
            callbacks = [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.should_abort is None:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        if ray.get_runtime_context().get_actor_id() is None:
            raise RuntimeError("MgRayTorchTrainer with should_abort runs its Train controller in the "
                               "calling process, which must be a Ray actor (a Tune trial's is)")
        self._wait_until_workers_fit()
        return asyncio.run(self._run_controller(controller_init_kwargs))

    def _wait_until_workers_fit(self) -> None:
        """Unless the cluster has the workers' resources free now, reserve them in a placement
        group, polling `should_abort`, then hand them back for the run's own group, created a
        moment later. (The check is by totals: on a cluster of several nodes a run can still
        wait for its group inside the controller, which then aborts once the group is placed.)"""
        from ray.util.placement_group import placement_group, remove_placement_group

        scaling = self.scaling_config
        bundle = scaling._resources_per_worker_not_none
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount * scaling.num_workers for name, amount in bundle.items()):
            return
        group = placement_group([bundle] * scaling.num_workers, strategy=scaling.placement_strategy)
        try:
            while not group.wait(RESOURCES_POLL_S):
                if self.should_abort():
                    raise TrainRunAborted(f"Train run {self.run_config.name!r} aborted before it started")
        finally:
            remove_placement_group(group)

    async def _run_controller(self, controller_init_kwargs) -> ray.train.Result:
        controller = TrainController(**controller_init_kwargs)
        run = asyncio.ensure_future(controller.run())
        while not (await asyncio.wait([run], timeout=ABORT_POLL_S))[0]:
            if self.should_abort():
                run.cancel()
                try:
                    await run
                except asyncio.CancelledError:
                    pass
                abort(controller)
                raise TrainRunAborted(f"Train run {self.run_config.name!r} aborted")
        run.result()  # raises what the controller raised
        return controller.get_result()


def abort(controller: TrainController) -> None:
    """Ray 2.60's `TrainController.abort`, less its last line (`ray.actor.exit_actor()`, which
    would end the calling actor). tests/train/test_torch_trainer.py fails when the original
    changes."""
    if controller.get_state().is_terminal():
        return
    controller._controller_callback_manager.invoke_best_effort("before_controller_abort")
    try:
        if controller._worker_group:
            controller._worker_group.abort()
        controller._set_state(AbortedState())
    except Exception as e:
        logger.exception("Error aborting worker group: %s", e)
