"""A real 2-node Ray cluster on this machine: a head and a second node (`ray start --address`),
1 CPU each, both on 127.0.0.1 with token authentication, and a 2-trial study submitted to it
whose two DDP workers cannot share a node (0.9 CPU each).

Asserts, from Ray's State API, that each trial's two workers ran on different nodes; the MLflow
tree (one study run, one child per trial, all closed); a checkpoint in the shared `storage_path`
that loads into the model; and that both nodes' processes are gone once they are stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.helpers import ROOT, cli_env, mlflow_client, runs

pytestmark = pytest.mark.slow

SPACE = """\
base: small
fixed:
  optim.epochs: 1
  optim.milestones: [1]
  optim.warmup_epochs: 0
  resources.num_workers: 2
  resources.cpus_per_worker: 0.9
  data.test_clips: 1
study:
  num_trials: 2
  seed: 0
  trial_driver_cpus: 0.05
  standby_trials: 0
  register_as: multinode-model
parameters:
  optim.lr: {type: float, low: 0.01, high: 0.1, log: true}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Two raylets on one host: every port each node listens on is its own."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def group_alive(pgid: int) -> set[int]:
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,pgid=,stat="], check=True, capture_output=True, text=True
    ).stdout
    return {
        int(pid)
        for pid, group, stat in (line.split() for line in out.splitlines())
        if int(group) == pgid and not stat.startswith("Z")
    }


def stop(node: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (`ray start --block` stops what it started), then
    SIGKILL to whatever is left of it."""
    os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    deadline = time.monotonic() + 10
    while group_alive(node.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(node.pid):
        os.killpg(node.pid, signal.SIGKILL)


def wait_for_cpus(env: dict[str, str], address: str, cpus: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={address}"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        if f"/{cpus}.0 CPU" in status.stdout:
            return
        time.sleep(1)
    raise AssertionError(
        f"the cluster never had {cpus} CPUs:\n{status.stdout}{status.stderr}\n{log.read_text()[-3000:]}"
    )


def test_a_study_on_two_nodes_spreads_each_trials_workers(tiny_dataset, tmp_path):
    home, shared = tmp_path / "home", tmp_path / "shared"
    ray_temp = Path(f"/tmp/mgr-{secrets.token_hex(4)}")  # Ray's unix sockets: keep the path short
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **cli_env(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--disable-usage-stats",
    ]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            subprocess.Popen(
                [
                    *ray,
                    "--head",
                    f"--port={port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={free_port()}",
                    f"--temp-dir={ray_temp}",
                    *node_ports(),
                ],
                env=env,
                stdout=(tmp_path / "head.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_for_cpus(env, address, 1, tmp_path / "head.log")
        nodes.append(
            subprocess.Popen(
                [*ray, f"--address={address}", *node_ports()],
                env=env,
                stdout=(tmp_path / "node2.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_for_cpus(env, address, 2, tmp_path / "node2.log")

        space = tmp_path / "space.yaml"
        space.write_text(SPACE)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mg_ray.cli",
                "tune",
                "--space",
                str(space),
                "--study",
                "mn",
                "--data",
                str(tiny_dataset),
                "--address",
                address,
                "--storage-path",
                str(shared),
            ],
            check=False,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

        # Ray's State API: every trial's worker group (one placement group) spans both nodes.
        probe = (
            "import json, sys; from ray.util.state import list_actors; "
            "print(json.dumps([(a.placement_group_id, a.node_id) for a in list_actors("
            "address=sys.argv[1], filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=1000)]))"
        )
        listed = subprocess.run(
            [sys.executable, "-c", probe, address],
            check=True,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        groups: dict[str, set[str]] = {}
        for group, node in json.loads(listed.stdout.strip().splitlines()[-1]):
            groups.setdefault(group, set()).add(node)
        assert len(groups) == 2 and all(len(group_nodes) == 2 for group_nodes in groups.values()), (
            groups
        )
    finally:
        for node in reversed(nodes):
            stop(node)
    assert not any(group_alive(node.pid) for node in nodes)  # both nodes' processes are gone

    client = mlflow_client(home)
    [parent] = runs(client, "tags.`mg_ray.role` = 'study' and tags.`mg_ray.study` = 'mn'")
    children = runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mg_ray.trial_state"] for c in children} == {"completed"}
    assert client.get_model_version_by_alias("multinode-model", "champion")

    # A checkpoint in the shared storage loads into the model it was trained as.
    from mg_ray.model_file import build_from_spec, safe_load

    [checkpoint, *_] = sorted(shared.glob("mn_train/*/checkpoint_*/checkpoint.pt"))
    run_id = children[0].info.run_id
    spec_file = client.download_artifacts(run_id, "config/model_spec.yaml", str(tmp_path))
    import yaml

    spec = yaml.safe_load(Path(spec_file).read_text())["model_spec"]
    state = safe_load(checkpoint)
    build_from_spec(spec).load_state_dict(state["model"])
    assert state["epoch"] == 0
