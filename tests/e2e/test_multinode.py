"""A real 2-node Ray cluster on this machine: a head and a second node (`ray start --address`),
1 CPU each, both on 127.0.0.1 with token authentication, and a one-trial study submitted to it
whose two DDP workers cannot share a node (0.9 CPU each).

Once the trial has an epoch in MLflow, the second node is lost (SIGKILL to every process it
runs) and a replacement joins: the study finishes, the trial resumed from its checkpoint
(Ray Train's and Tune's failure settings, `mg_ray/train/trainer.py`, `study.trial_max_failures`).
Then a one-trial study loses that node for good: it stops after its `placement_timeout_s` with
one line (exit 2), and once another node joins the same command completes it.

Asserts, from Ray's State API, that each trial's two workers ran on different nodes; the MLflow
tree (one study run, one child per trial, all closed, each with every epoch); a checkpoint in
the shared `storage_path` that loads into the model; and that the nodes' processes are gone
once they are stopped.
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

from tests.e2e.helpers import ROOT, cli_env, command, ending, epochs_logged, mlflow_client, runs

pytestmark = pytest.mark.slow

SPACE = """\
base: small
fixed:
  optim.epochs: 6
  optim.milestones: [6]
  optim.warmup_epochs: 0
  resources.num_workers: 2
  resources.cpus_per_worker: 0.9
  data.test_clips: 1
study:
  num_trials: 1
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


def stop(node: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig` to the node's process group (SIGTERM: `ray start --block` stops what it started;
    SIGKILL: a lost node), then SIGKILL to whatever is left of it."""
    if group_alive(node.pid):
        os.killpg(node.pid, sig)
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


def wait_for_an_epoch(home: Path, study: subprocess.Popen, log: Path, name: str) -> None:
    """Until a trial of study `name` has an epoch in MLflow."""
    client = mlflow_client(home)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and study.poll() is None:
        if (home / "mlflow.db").exists():
            trials = runs(
                client, f"tags.`mg_ray.role` = 'trial' and tags.`mg_ray.study` = '{name}'"
            )
            if any(epochs_logged(client, t.info.run_id) >= 1 for t in trials):
                return
        time.sleep(0.5)
    raise AssertionError("no trial trained an epoch:\n" + log.read_text()[-4000:])


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
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **cli_env(home),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # The cluster's own address, for what in its processes finds "the" cluster through the
        # State API without one: Ray Train's placement-group cleaner, which frees the workers'
        # CPUs when a lost node took a trial's controller with it. The suite may run another
        # test's local cluster on this host meanwhile, and then, with no address, the cleaner
        # fails ("Found multiple active Ray instances"). One host per node has one cluster.
        "RAY_ADDRESS": address,
    }
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

        def study(name: str, space_text: str) -> tuple[subprocess.Popen, Path]:
            space = tmp_path / f"{name}.yaml"
            space.write_text(space_text)
            log = tmp_path / f"{name}.log"
            tune = [*command("tune", "--space", str(space), "--study", name)]
            tune += ["--data", str(tiny_dataset), "--address", address]
            tune += ["--storage-path", str(shared)]
            proc = subprocess.Popen(
                tune,
                env=env,
                cwd=ROOT,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            return proc, log

        def new_node(log_name: str) -> None:
            nodes.append(
                subprocess.Popen(
                    [*ray, f"--address={address}", *node_ports()],
                    env=env,
                    stdout=(tmp_path / log_name).open("w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

        # A node lost mid-trial, and a replacement joins: the study finishes.
        proc, log = study("mn", SPACE)
        with ending(proc):
            wait_for_an_epoch(home, proc, log, "mn")
            stop(nodes[1], sig=signal.SIGKILL)  # the node is lost, with whatever ran on it
            new_node("node3.log")
            assert proc.wait(timeout=900) == 0, log.read_text()[-8000:]
        # the lost node's trial went on from its checkpoint, not from scratch
        assert "resumed from the checkpoint of epoch" in log.read_text()

        # A node lost for good: the study stops after its placement_timeout_s with one line,
        # resumable; once a node joins, the same command completes it.
        lost = SPACE.replace(
            "register_as: multinode-model", "register_as: mn-lost\n  placement_timeout_s: 5"
        )
        proc, log = study("mn-lost", lost)
        with ending(proc):
            wait_for_an_epoch(home, proc, log, "mn-lost")
            stop(nodes[-1], sig=signal.SIGKILL)
            assert proc.wait(timeout=300) == 2, log.read_text()[-8000:]
        text = log.read_text()
        assert "each trial of study 'mn-lost' needs 1.85 CPUs" in text, text[-4000:]
        assert "(study.placement_timeout_s: 5); the study stops" in text, text[-4000:]
        new_node("node4.log")
        wait_for_cpus(env, address, 2, tmp_path / "node4.log")
        proc, log = study("mn-lost", lost)
        with ending(proc):
            assert proc.wait(timeout=600) == 0, log.read_text()[-8000:]
        assert "resuming study 'mn-lost'" in log.read_text()

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
        # (the lost node's trial had a second worker group: Ray Train restarted it)
        assert len(groups) >= 2 and all(len(group_nodes) == 2 for group_nodes in groups.values()), (
            groups
        )
    finally:
        for node in reversed(nodes):
            stop(node)
    assert not any(group_alive(node.pid) for node in nodes)  # both nodes' processes are gone

    client = mlflow_client(home)
    [parent] = runs(client, "tags.`mg_ray.role` = 'study' and tags.`mg_ray.study` = 'mn'")
    children = runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 1
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mg_ray.trial_state"] for c in children} == {"completed"}
    assert all(epochs_logged(client, c.info.run_id) == 6 for c in children)
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
    assert 0 <= state["epoch"] < 6
