"""Resource rules, written against given cluster totals (no Ray): `check_resources` refuses a
request that could never be placed, naming what it needs and the fix, and
`max_concurrent_trials` sizes a study's concurrency from the same totals."""

from __future__ import annotations

import pytest

from mg_ray.cluster import ResourceError, check_resources
from mg_ray.train.config import ExperimentConfig, ResourcesConfig
from mg_ray.tune.space import SearchSpace, StudySettings
from mg_ray.tune.study import max_concurrent_trials


def test_a_request_that_fits_exactly_is_accepted():
    check_resources(2, 0.95, False, reserved_cpus=0.1, total={"CPU": 2.0})
    check_resources(2, 1.0, True, total={"CPU": 4.0, "GPU": 2.0})


def test_too_many_cpus_is_refused_with_a_fractional_fix():
    with pytest.raises(ResourceError) as err:
        check_resources(
            2, 1.0, False, reserved_cpus=0.1, what="a trial", total={"CPU": 2.0}, cluster="here"
        )
    message = str(err.value)
    assert "a trial needs 2.1 CPUs (2 workers x 1 CPU + 0.1 for the trial driver)" in message
    assert "here has 2" in message
    assert "--cpus-per-worker 0.95" in message


def test_a_driver_share_alone_over_the_cluster_asks_for_more_cpus():
    with pytest.raises(ResourceError, match="add CPUs to the cluster"):
        check_resources(1, 0.5, False, reserved_cpus=2.0, total={"CPU": 2.0})


def test_gpus_missing_or_too_few_are_refused():
    with pytest.raises(ResourceError, match="asks for 2 GPU\\(s\\) but the Ray cluster has 1"):
        check_resources(2, 1.0, True, total={"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ResourceError, match="use_gpu=false"):
        check_resources(1, 1.0, True, total={"CPU": 8.0})


def test_a_worker_larger_than_every_node_is_refused_naming_the_nodes():
    two_small = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_resources(2, 0.9, False, reserved_cpus=0.05, total={"CPU": 2.0}, nodes=two_small)
    with pytest.raises(ResourceError) as err:
        check_resources(1, 1.5, False, total={"CPU": 2.0}, nodes=two_small, cluster="here")
    assert str(err.value) == (
        "training run needs 1 workers of 1.5 CPU, each whole on one node, but the nodes of here "
        "(1 CPU, 1 CPU) hold 0: it would never start. Fix: use fewer workers, or "
        "--cpus-per-worker 1 (fractional CPUs work)."
    )
    # GPUs are counted per node too: one GPU beside one CPU holds one 1-CPU worker
    gpu_nodes = [{"CPU": 1.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0}]
    with pytest.raises(ResourceError, match=r"\(1 CPU 2 GPU, 8 CPU 0 GPU\) hold 1.*use_gpu=false"):
        check_resources(2, 1.0, True, total={"CPU": 9.0, "GPU": 2.0}, nodes=gpu_nodes)
    check_resources(2, 1.0, True, total={"CPU": 2.0, "GPU": 2.0}, nodes=[{"CPU": 2.0, "GPU": 2.0}])


def concurrency(total, *, workers=2, cpus=0.95, gpu=False, gpu_share=1.0, **study) -> int:
    space = SearchSpace(study=StudySettings(**{"trial_driver_cpus": 0.1, **study}))
    cfg = ExperimentConfig(
        resources=ResourcesConfig(
            num_workers=workers, cpus_per_worker=cpus, use_gpu=gpu, gpus_per_worker=gpu_share
        )
    )
    return max_concurrent_trials(space, cfg, total)


@pytest.mark.parametrize(
    ("total", "study", "expected"),
    [
        # 2 CPUs fit one 2 x 0.95 + 0.1 trial, plus one standby trial
        ({"CPU": 2.0}, {"num_trials": 8}, 2),
        ({"CPU": 2.0}, {"num_trials": 8, "standby_trials": 0}, 1),
        # 8 CPUs fit four trials (4 x 2.0 = 8.0 exactly, float sums included)
        ({"CPU": 8.0}, {"num_trials": 8, "standby_trials": 0}, 4),
        # never more than the study's trials, nor than max_concurrent
        ({"CPU": 8.0}, {"num_trials": 3}, 3),
        ({"CPU": 8.0}, {"num_trials": 8, "max_concurrent": 2}, 2),
        # a cluster too small still runs one trial at a time (check_resources refuses earlier)
        ({"CPU": 1.0}, {"num_trials": 8, "standby_trials": 0}, 1),
    ],
)
def test_max_concurrent_trials_from_cpus(total, study, expected):
    assert concurrency(total, **study) == expected


def test_max_concurrent_trials_is_bounded_by_gpus():
    # 16 CPUs would fit 8 trials of 2 workers, but 3 GPUs give one 2-GPU trial
    total = {"CPU": 16.0, "GPU": 3.0}
    assert concurrency(total, cpus=1.0, gpu=True, num_trials=8, standby_trials=0) == 1
    assert concurrency(total, cpus=1.0, gpu=True, num_trials=8) == 2


def test_a_gpu_shared_by_trials_at_half_a_gpu_each():
    # two 1-worker trials at 0.5 GPU share one GPU (Ray's fractional GPUs)
    total = {"CPU": 16.0, "GPU": 1.0}
    assert concurrency(total, workers=1, gpu=True, gpu_share=0.5, num_trials=4) == 3  # + standby
    assert (
        concurrency(total, workers=1, gpu=True, gpu_share=0.5, num_trials=4, standby_trials=0) == 2
    )
    check_resources(2, 1.0, True, gpus_per_worker=0.5, total=total, nodes=[total])
    with pytest.raises(ResourceError, match=r"asks for 1.5 GPU\(s\) but the Ray cluster has 1"):
        check_resources(3, 1.0, True, gpus_per_worker=0.5, total=total)
    # per node: 0.5 GPU left on each of two nodes does not hold a 1-GPU worker
    halves = [{"CPU": 4.0, "GPU": 0.5}, {"CPU": 4.0, "GPU": 0.5}]
    with pytest.raises(ResourceError, match=r"workers of 1 CPU and 1 GPU.*hold 0"):
        check_resources(1, 1.0, True, total={"CPU": 8.0, "GPU": 1.0}, nodes=halves)
    check_resources(2, 1.0, True, gpus_per_worker=0.5, total={"CPU": 8.0, "GPU": 1.0}, nodes=halves)


def test_gpus_per_worker_is_a_share_of_one_gpu():
    from mg_ray.config import ConfigError

    with pytest.raises(ConfigError, match="gpus_per_worker.*\\(0, 1\\]"):
        ResourcesConfig(gpus_per_worker=2).validate()


# A second local cluster on this host, as another study's driver starts one; it ends with its
# standard input.
OTHER_CLUSTER = (
    "import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False); "
    "print('up', flush=True); sys.stdin.read(); ray.shutdown()"
)


@pytest.mark.slow
def test_a_private_clusters_processes_reach_its_own_state_api_beside_another_cluster():
    """Ray Train's placement-group cleaner asks the State API, with no address, whether its
    Train controller still lives; with a second cluster on the host that call fails unless the
    cluster's processes know their own dashboard (`init_ray`), and the CPUs of every trial ASHA
    stops stay held. Asked here the same way, from an actor of a private cluster started while
    another cluster runs. The driver's own environment is given back."""
    import os
    import subprocess
    import sys

    import ray

    from mg_ray.cluster import init_ray

    @ray.remote(num_cpus=0)
    class Probe:
        def my_state(self) -> str:
            from ray.util.state import get_actor

            me = ray.get_runtime_context().get_actor_id()
            return get_actor(me, timeout=30).state  # no address, as the cleaner asks

    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_CLUSTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )
    try:
        assert other.stdout.readline().strip() == "up"
        init_ray(num_cpus=1)
        try:
            assert ray.get(Probe.remote().my_state.remote(), timeout=120) == "ALIVE"
        finally:
            ray.shutdown()
        assert os.environ.get("RAY_API_SERVER_ADDRESS") == before
    finally:
        other.communicate(input="", timeout=120)


# Holds the host lock `init_ray` takes around starting a local cluster, until its input ends.
LOCK_HOLDER = (
    "import sys; from mg_ray.cluster import LOCAL_START_LOCK; from mg_ray.paths import exclusive\n"
    "with exclusive(LOCAL_START_LOCK):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


def test_local_clusters_on_one_host_start_one_at_a_time():
    """Two drivers starting private clusters at once could both see Ray's dashboard port free
    and pick it; one dashboard would then fail after a minute. Starting one is therefore done
    under a host lock: while another process holds it, a second start waits."""
    import subprocess
    import sys
    import threading

    from mg_ray.cluster import LOCAL_START_LOCK
    from mg_ray.paths import exclusive

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with exclusive(LOCAL_START_LOCK):
                got.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not got.wait(timeout=1.0)  # waits while the other process holds it
        holder.stdin.close()
        assert got.wait(timeout=30)  # and gets it once that process lets go
    finally:
        holder.kill()
        holder.wait(timeout=30)
