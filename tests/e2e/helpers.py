"""Running the real entry points in subprocesses (each with its own local Ray cluster) and
reading what they left in MLflow. No mocks: a real Ray cluster, a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a user with MG_RAY_HOME=home and nothing else set for Ray or MLflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "MG_RAY_"))}
    return {**env, "MG_RAY_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def command(*args: str) -> list[str]:
    """`mg-ray ARGS` with this interpreter (jobs/*.py take the same arguments)."""
    return [sys.executable, "-m", "mg_ray.cli", *args]


def run(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(*args),
        check=False,
        env=cli_env(home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"mg-ray {' '.join(args)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    )
    return done


def start(home: Path, *args: str, log: Path) -> subprocess.Popen:
    """Start `mg-ray ARGS` in its own session (so the test can kill it and its Ray cluster)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command(*args),
            env=cli_env(home),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def ending(proc: subprocess.Popen):
    """Whatever happens inside, `proc` (a driver started in its own session) has ended after:
    SIGKILL to its process group if it still runs."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mlflow_client(home: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(client, filter_string: str = "") -> list:
    experiment = client.get_experiment_by_name("mg-ray")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], filter_string=filter_string, max_results=1000
    )


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def train_workers(pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes under process `pid` (its local Ray cluster's workers)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ray_processes_of(home: Path, title: str = "RayTrainWorker") -> list[psutil.Process]:
    """Live processes whose title contains `title` (Ray names a worker process after its actor)
    and whose environment has MG_RAY_HOME=home: the ones a job run with that home started,
    wherever they were reparented after their driver exited."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (
                title in " ".join(proc.info["cmdline"] or [])
                and proc.status() != psutil.STATUS_ZOMBIE
                and proc.environ().get("MG_RAY_HOME") == str(home)
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def no_train_workers_left(home: Path, timeout_s: float = 30) -> bool:
    """True once no Ray Train worker of a job run with MG_RAY_HOME=home is alive."""
    import time

    deadline = time.monotonic() + timeout_s
    while ray_processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not ray_processes_of(home)


def epochs_logged(client, run_id: str, key: str = "val_top1") -> int:
    """The epochs a run logged `key` for: distinct steps (the run's logged model links the best
    epoch's validation metrics to itself by logging them once more, at the same step)."""
    return len({m.step for m in client.get_metric_history(run_id, key)})
