"""Suite-wide settings and fixtures.

Every test writes under a temporary MG_RAY_HOME, never ~/.mg-ray, and MLFLOW_TRACKING_URI is
unset so MLflow goes to that home's sqlite store. `tiny_dataset` is a real synthetic dataset (H.264
clips decord reads, COCO-17 skeletons) written once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# 3 subjects (one each for train, val and test) x 10 classes x 1 clip = 30 clips of 40 frames.
# 40 frames is enough for 32-frame pose sampling without looping; 160x120 is the default size.
TINY_SETTINGS = {
    "seed": 0,
    "subjects": 3,
    "clips_per_class": 1,
    "frames": 40,
    "width": 160,
    "height": 120,
    "workers": 1,
}


# `make test` runs the suite in two processes (pytest-xdist: `-n 2 --dist loadfile`, each module
# whole in one process, so that its module-scoped runs and clusters are made once). An
# end-to-end test leaves one of the two cores idle for about a third of its time, mostly while
# Ray starts a trial's processes one after another, each importing torch; the other process
# uses it. A process takes the next module in collection order when it is nearly done with its
# own, so the end-to-end modules go first, the longest first (their seconds in the clean-clone
# CI of 0e05207, run one after another): the two processes then end close together.
LONGEST_FIRST = [
    "tests/e2e/test_study_endings.py",  # 400 s
    "tests/e2e/test_pipeline.py",  # 290 s
    "tests/e2e/test_multinode.py",  # 189 s
    "tests/infra/test_local_stack.py",  # 162 s
    "tests/e2e/test_study.py",  # 110 s
    "tests/e2e/test_real_data.py",  # 95 s
    "tests/e2e/test_train.py",  # 90 s
    "tests/e2e/test_serving.py",  # 55 s
    "tests/tune/test_trial.py",  # 40 s
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: the order does not matter
        return
    rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mg_ray_home")
    old = {k: os.environ.get(k) for k in ("MG_RAY_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["MG_RAY_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny synthetic dataset in the mg-ray format (read-only: do not modify it;
    copy it first if a test needs to break something)."""
    from mg_ray.data import synth

    return synth.generate(tmp_path_factory.mktemp("data") / "tiny", **TINY_SETTINGS)


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray cluster of 2 CPUs in this process, for the module's tests."""
    import ray

    from mg_ray.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def wait_for_free_cpus(cpus: float, timeout_s: float = 10) -> float:
    """Wait until the cluster has `cpus` CPUs available (or the timeout); returns what it has."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)
