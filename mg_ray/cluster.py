"""The Ray cluster a job runs on: connecting to it, and refusing requests it can never satisfy.

`init_ray` connects to the cluster in `--address` / RAY_ADDRESS, or starts a private local one.
`check_resources` refuses, with the fix, a training request that the cluster can never place (Ray
would wait for it forever). For a local cluster the same check runs before Ray starts
(`check_local_resources`), on the CPUs Ray will find, so a bad request fails in a second.
Once connected, SIGTERM raises `Terminated`, an interruption like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from mg_ray import paths, ray_env


class ResourceError(RuntimeError):
    """The cluster cannot run what was asked: raised before anything waits on resources."""


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to connect to: `address`, else RAY_ADDRESS, else None (a private local one)."""
    return address or os.environ.get("RAY_ADDRESS") or None


class Terminated(KeyboardInterrupt):
    """The process got SIGTERM (`ray job stop`, `timeout`, systemd, Kubernetes): an interruption,
    handled where Ctrl-C is. `signum` gives the exit status 128 + signum."""

    signum = signal.SIGTERM


def raise_terminated(signum, frame) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


# Held while a driver starts a private local cluster (`init_ray`), by every mg-ray on this host.
LOCAL_START_LOCK = Path(tempfile.gettempdir()) / "mg-ray-start-local-ray.lock"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / RAY_ADDRESS, or start a private local cluster.

    Without an address we start a private local cluster (`address="local"`) rather than letting
    `ray.init()` attach to whatever cluster happens to run on this machine. Its dashboard (which
    serves the State API) listens on loopback only. (Ray 2.60 binds its internal ports to the
    node's address whatever it is given; `infra/local/start.sh` has the same limit.)
    """
    import ray  # heavy: the checks of this module run before Ray is needed, without it

    if ray.is_initialized():
        return
    address = cluster_address(address)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray_env.apply_defaults(ray_env.LOCAL_CLUSTER)  # inherited by the cluster's processes
        # The port is chosen before Ray binds it, so two drivers starting here at once could both
        # pick 8265 and one dashboard would fail after a minute: they take turns (a host lock).
        with paths.exclusive(LOCAL_START_LOCK):
            start_local_ray(num_cpus)
    # A Ray driver turns SIGTERM into sys.exit(15) (ray.init installs that handler), which code
    # that closes runs on an interruption does not catch: make it one (Terminated).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def start_local_ray(num_cpus: int | None) -> None:
    """Start a private local cluster with its dashboard (and State API) on loopback."""
    import ray

    dashboard_port = local_dashboard_port()
    # The cluster's processes find its State API through RAY_API_SERVER_ADDRESS (Ray's
    # documented variable for the dashboard's address), set while Ray starts them, whatever
    # it was: what in them asks the State API without an address, as Ray Train's
    # placement-group cleaner does, otherwise looks for "the" cluster on this host. With
    # another cluster here (a second study's, a `ray start` one) that fails and the cleaner
    # ends: the CPUs of each trial ASHA stops then stay held by its dead controller's
    # placement group, and the next trial waits for them forever. (This process's own
    # environment is given back: the variable overrides any address given to Ray's job and
    # State clients, and this process may talk to other clusters.)
    with environment(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard_port}"):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=True,
        )


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """`values` in os.environ meanwhile; what was there before is put back."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def local_dashboard_port(default: int = 8265) -> int:
    """Ray's default dashboard port when it is free on 127.0.0.1, else a free one."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", default))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_resources() -> dict[str, float]:
    """The CPUs (and whether there are GPUs) a local cluster started here will have, without
    starting it: the CPUs this process may run on, GPUs when an NVIDIA driver is present."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    has_gpu = shutil.which("nvidia-smi") is not None or os.path.exists(
        "/proc/driver/nvidia/version"
    )
    return {"CPU": float(cpus), "GPU": 1.0 if has_gpu else 0.0}


def check_resources(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    gpus_per_worker: float = 1.0,
    reserved_cpus: float = 0.0,
    what: str = "training run",
    total: dict[str, float] | None = None,
    nodes: list[dict[str, float]] | None = None,
    cluster: str = "the Ray cluster",
) -> None:
    """Refuse, with the fix, a request the cluster can never satisfy.

    reserved_cpus: CPUs held besides the workers (a Tune trial's driver holds some).
    total, nodes: the cluster's resources and each node's (default: the connected cluster's).
    """
    if total is None:
        import ray

        total, nodes = ray.cluster_resources(), node_resources()
    request = dict(
        num_workers=num_workers,
        cpus_per_worker=cpus_per_worker,
        use_gpu=use_gpu,
        gpus_per_worker=gpus_per_worker,
    )
    short = shortfall(
        **request, reserved_cpus=reserved_cpus, total=total, nodes=nodes, cluster=cluster
    )
    if short is None:
        return
    resource, short = short
    if resource == "GPU":
        raise ResourceError(
            f"{what} {short}. Fix: set resources.use_gpu=false (--cpu) or connect to a cluster "
            "with GPU nodes."
        )
    fit_cpus = max(0.0, total.get("CPU", 0.0) - reserved_cpus) / num_workers
    if nodes:  # no worker may be larger than the largest node
        fit_cpus = min(fit_cpus, max(node.get("CPU", 0.0) for node in nodes))
    hint = (
        f"use fewer workers, or --cpus-per-worker {fit_cpus:.2g} (fractional CPUs work)"
        if fit_cpus > 0
        else "add CPUs to the cluster"
    )
    raise ResourceError(f"{what} {short}: it would never start. Fix: {hint}.")


def shortfall(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    gpus_per_worker: float = 1.0,
    reserved_cpus: float = 0.0,
    total: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
    cluster: str = "the Ray cluster",
) -> tuple[str, str] | None:
    """What one request lacks in `total` (a cluster's resources) or, given `nodes` (each alive
    node's resources), in their shapes: the resource ("CPU" or "GPU") and a phrase that says so;
    None when it fits. Each worker is one bundle of Ray Train's placement group, placed whole on
    one node: 2 nodes of 1 CPU hold 2 workers of 0.9 CPU, but not 1 of 1.5."""
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need = num_workers * cpus_per_worker + reserved_cpus
    if need > cpus + 1e-9:
        return "CPU", (
            f"needs {need:g} CPUs ({num_workers} workers x {cpus_per_worker:g} CPU"
            + (f" + {reserved_cpus:g} for the trial driver" if reserved_cpus else "")
            + f") but {cluster} has {cpus:g}"
        )
    if use_gpu and gpus + 1e-9 < num_workers * gpus_per_worker:
        return (
            "GPU",
            f"asks for {num_workers * gpus_per_worker:g} GPU(s) but {cluster} has {gpus:g}",
        )
    fit = workers_that_fit(cpus_per_worker, use_gpu, nodes, gpus_per_worker) if nodes else 0
    if nodes is not None and fit < num_workers:
        by_cpu = workers_that_fit(cpus_per_worker, False, nodes) < num_workers
        shapes = ", ".join(
            f"{n.get('CPU', 0.0):g} CPU" + (f" {n.get('GPU', 0.0):g} GPU" if use_gpu else "")
            for n in nodes
        )
        each = f"{cpus_per_worker:g} CPU" + (f" and {gpus_per_worker:g} GPU" if use_gpu else "")
        return "CPU" if by_cpu else "GPU", (
            f"needs {num_workers} workers of {each}, each whole on one node, but the nodes of "
            f"{cluster} ({shapes}) hold {fit}"
        )
    return None


def workers_that_fit(
    cpus_per_worker: float,
    use_gpu: bool,
    nodes: list[dict[str, float]],
    gpus_per_worker: float = 1.0,
) -> int:
    """How many workers of `cpus_per_worker` CPUs (and `gpus_per_worker` of a GPU each with
    `use_gpu`) the `nodes` can hold at once, each worker whole on one node."""
    fit = 0
    for node in nodes:
        here = int(node.get("CPU", 0.0) / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 10**6
        on_gpus = int(node.get("GPU", 0.0) / gpus_per_worker + 1e-9)
        fit += min(here, on_gpus) if use_gpu else here
    return fit


def node_resources() -> list[dict[str, float]]:
    """The resources of each alive node of the connected cluster (`ray.nodes()`)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_local_resources(address: str | None, **request) -> None:
    """`check_resources` before Ray starts, when the job will start a local cluster (no
    address): on the CPUs that cluster will have. GPU counts are checked once Ray is up (only
    their absence is known here)."""
    if cluster_address(address) is not None:
        return
    total = local_resources()
    if request.get("use_gpu") and total["GPU"]:
        request = {**request, "use_gpu": False}  # some GPUs: counted by Ray once it is up
    check_resources(**request, total=total, cluster="a local Ray cluster on this machine")
