"""How the study driver stops a trial's Train run, and how the trial notices.

A study reuses trial actors (`reuse_actors`): a trial's driver process, with Ray Tune, Ray Train,
torch and MLflow imported, goes on to the next trial once its function has returned. When Tune
stops a trial midway (ASHA, the time budget), nothing in Tune tells the trial's function: it
would train on in its actor, holding the CPUs that the next trial waits for, until the actor is
handed over; and when the actor is not reused, Tune kills it, and with it the run's controller
in the middle of whatever it was doing.

So a trial's driver keeps a key in Ray's key-value store (the GCS) while its Train run goes on.
The study driver, told by Tune that the trial stopped, sets the key to "abort" and waits, a
second or so, until the trial's driver has aborted the run (Ray Train's graceful abort: workers
shut down, placement group removed) and deleted the key. Only then does Tune reuse or remove the
actor. The run's controller runs in the trial's actor (`MgRayTorchTrainer` with `should_abort`),
so the actor is the creator of the run's placement group: when it dies (killed by Tune, or out
of memory), the group is left behind, and the study driver removes it
(`remove_orphaned_placement_groups`).
"""

from __future__ import annotations

import threading
import time

NAMESPACE = "mg_ray_trial_runs"
RUNNING, ABORT = b"running", b"abort"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def mark_running(run_name: str) -> None:
    """The trial's driver: its Train run `run_name` is starting."""
    _kv()._internal_kv_put(run_name, RUNNING, namespace=NAMESPACE)


def abort_requested(run_name: str) -> bool:
    """The trial's driver, every 0.2 s while the run goes on: has the study driver asked?"""
    return _kv()._internal_kv_get(run_name, namespace=NAMESPACE) == ABORT


def mark_ended(run_name: str) -> None:
    """The trial's driver: the run has ended (finished, failed or aborted)."""
    _kv()._internal_kv_del(run_name, namespace=NAMESPACE)


def abort_and_wait(run_name: str, timeout_s: float) -> float | None:
    """The study driver: ask the trial's driver to abort run `run_name` and wait until it has.

    Returns the seconds it took; 0.0 when the run had already ended; None when the trial's
    driver did not answer within `timeout_s` (it died, or is stuck), after which the request
    is withdrawn.
    """
    kv = _kv()
    if not kv._internal_kv_exists(run_name, namespace=NAMESPACE):
        return 0.0
    started = time.monotonic()
    kv._internal_kv_put(run_name, ABORT, namespace=NAMESPACE)
    while kv._internal_kv_exists(run_name, namespace=NAMESPACE):
        if time.monotonic() - started > timeout_s:
            kv._internal_kv_del(run_name, namespace=NAMESPACE)
            return None
        time.sleep(0.05)
    return time.monotonic() - started


def tune_stop_event() -> threading.Event:
    """The event Ray Tune sets when it stops the trial running in this thread's function
    trainable (`session.finish`: when its actor is removed, or handed to the next trial). A
    private part of Ray 2.60's Tune session, pinned down by tests/tune/test_trial_abort.py."""
    from ray.train._internal.session import get_session

    return get_session().stop_event


def remove_orphaned_placement_groups() -> list[str]:
    """Remove this job's placement groups whose creator actor is dead; returns their ids.

    Ray keeps a placement group until its creator *and* its job are gone, so the group of a
    trial's actor that died (the controller of its Train run: `MgRayTorchTrainer`) holds its
    CPUs until the study ends, and a study whose trials need those CPUs waits forever. (Ray
    Train's placement-group cleaner, one more actor per run, is left out of trial runs: this
    covers it.) Detached groups, groups created by a driver and other jobs' groups are left
    alone. Reads the GCS's placement group table (Ray 2.60, private;
    tests/tune/test_trial_abort.py).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (group.is_detached or group.state == gcs_pb2.PlacementGroupTableData.REMOVED
                or ray.ActorID(group.creator_actor_id).is_nil() or not group.creator_actor_dead
                or ray.JobID(group.creator_job_id).hex() != job_id):
            continue
        group_id = ray.PlacementGroupID(group.placement_group_id)
        remove_placement_group(PlacementGroup(group_id))
        removed.append(group_id.hex())
    return removed
