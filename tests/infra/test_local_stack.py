"""End to end: infra/local/start.sh brings up Ray (token auth) + MLflow on loopback, stop.sh ends
exactly those processes.

Runs against a temporary MG_RAY_HOME and free ports, so it collides with no other stack on the
machine. A stack's start takes about 15 s: one stack serves the authentication, `ray job stop`
and stop.sh checks; the README's section starts its own, as written.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "infra" / "local"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=10
        ) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def group_pids(pgid: int) -> set[int]:
    """Live (non-zombie) processes in a process group."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,pgid=,stat="], check=False, capture_output=True, text=True
    ).stdout
    return {
        int(pid)
        for pid, group, stat in (line.split() for line in out.splitlines())
        if int(group) == pgid and not stat.startswith("Z")
    }


class Stack:
    """Ports, paths and environments of one test stack."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "home"
        self.stack_dir = self.home / "stack"
        # Ray keeps unix sockets in its temp dir: keep the path short (108-byte limit).
        self.ray_temp = Path(tempfile.mkdtemp(prefix="mgr-", dir="/tmp"))
        self.ports = {
            name: free_port()
            for name in ("RAY", "DASHBOARD", "DASHBOARD_AGENT", "CLIENT", "MLFLOW")
        }
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("RAY_", "MLFLOW_", "MG_RAY_"))
            },
            "PATH": f"{venv_bin}:{os.environ['PATH']}",
            "MG_RAY_HOME": str(self.home),
            "MG_RAY_RAY_TEMP_DIR": str(self.ray_temp),
            "MG_RAY_START_TIMEOUT": "90",
            "MG_RAY_MLFLOW_WORKERS": "1",
            **{f"MG_RAY_{name}_PORT": str(port) for name, port in self.ports.items()},
        }

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['DASHBOARD']}"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.ports['MLFLOW']}"

    def client_env(self) -> dict[str, str]:
        """The environment after `source infra/local/env.sh`."""
        out = subprocess.run(
            ["bash", "-c", f"source {LOCAL / 'env.sh'} && env -0"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)

    def run(self, script: str, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL / script), *args],
            check=False,
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pid(self, name: str) -> int:
        return int((self.stack_dir / name).read_text())


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path)
    started = stack.run("start.sh", "--num-cpus", "2")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield stack
    finally:
        stack.run("stop.sh", timeout=90)
        shutil.rmtree(stack.ray_temp, ignore_errors=True)


def test_local_stack_authenticates_takes_a_stopped_job_and_stops(stack, tiny_dataset, tmp_path):
    """One stack serves the three checks (each stack start takes about 15 s): token auth on
    loopback, a study job stopped with `ray job stop` and submitted again, and stop.sh ending
    exactly the stack's processes."""
    ray_pgid, mlflow_pgid = stack.pid("ray-head.pid"), stack.pid("mlflow.pid")
    ours = check_authentication(stack, ray_pgid, mlflow_pgid)
    ray_job_stop_interrupts_the_study_and_resubmitting_resumes_it(stack, tiny_dataset, tmp_path)
    check_stop(stack, ray_pgid, mlflow_pgid, ours)


def check_authentication(stack, ray_pgid: int, mlflow_pgid: int) -> set[int]:
    """The stack's processes (returned), MLflow on loopback, Ray's job API behind the token."""
    ours = group_pids(ray_pgid) | group_pids(mlflow_pgid)
    assert ray_pgid in ours and mlflow_pgid in ours

    # MLflow answers on loopback; the artifact store is proxied into the stack dir.
    assert http_status(f"{stack.mlflow}/health") == 200
    token = (stack.stack_dir / "ray_auth_token").read_text()
    assert len(token) == 64 and (stack.stack_dir / "ray_auth_token").stat().st_mode & 0o077 == 0

    # Ray's job API refuses requests without the token, and takes them with it.
    jobs = f"{stack.dashboard}/api/jobs/"
    assert http_status(jobs) == 401
    assert http_status(jobs, {"Authorization": "Bearer not-the-token"}) == 403
    assert http_status(jobs, {"Authorization": f"Bearer {token}"}) == 200

    # The CLI with env.sh's environment gets in; without it (and without ~/.ray/auth_token) not.
    client = stack.client_env()
    assert (
        client["RAY_ADDRESS"] == stack.dashboard and client["MLFLOW_TRACKING_URI"] == stack.mlflow
    )
    gcs = f"127.0.0.1:{stack.ports['RAY']}"
    status = subprocess.run(
        ["ray", "status", "--address", gcs],
        check=False,
        env=client,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "2.0 CPU" in status.stdout, status.stdout + status.stderr
    anonymous = {**stack.env, "HOME": str(stack.home)}
    refused = subprocess.run(
        ["ray", "job", "list", "--address", stack.dashboard],
        check=False,
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

    # A second start is a no-op.
    again = stack.run("start.sh")
    assert again.returncode == 0 and "already running" in again.stdout
    return ours


def check_stop(stack, ray_pgid: int, mlflow_pgid: int, ours: set[int]) -> None:
    """stop.sh ends the stack's processes (`ours`) and frees its ports; twice is harmless."""
    stopped = stack.run("stop.sh", timeout=90)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while (group_pids(ray_pgid) | group_pids(mlflow_pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_pids(ray_pgid) | group_pids(mlflow_pgid)
    assert not [
        pid
        for pid in ours
        if Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    ]
    assert not any(port_open(stack.ports[name]) for name in ("RAY", "DASHBOARD", "MLFLOW"))
    assert not (stack.stack_dir / "ray-head.pid").exists()
    assert stack.run("stop.sh").returncode == 0  # idempotent


def readme_cluster_blocks() -> list[str]:
    """The bash blocks of README.md's "Running on a cluster" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```bash\n(.*?)```", section, re.DOTALL)


TINY_QUICK = """\
base: small
fixed:
  optim.epochs: 1
  optim.milestones: [1]
  optim.warmup_epochs: 0
  resources.num_workers: 2
  resources.cpus_per_worker: 0.9
  data.test_clips: 1
study:
  num_trials: 1
  trial_driver_cpus: 0.05
parameters:
  optim.lr: {type: float, low: 0.01, high: 0.1, log: true}
"""


def test_readme_cluster_section_verbatim(tmp_path, tiny_dataset):
    """Start the stack, `ray job submit` a study, promote, predict and stop, with the README's
    commands as written, except: free ports, a temporary home, and in place of the quick study
    (the paper's recipe, minutes of training) a one-trial study of the same name on the tiny
    dataset (tests/e2e covers the pipeline itself). Then check the study's MLflow run tree and
    the registry on the MLflow server, that outputs landed in the stack's home, and that no
    process is left behind."""
    from mg_ray.data import load_index

    *run_blocks, stop_block = readme_cluster_blocks()
    assert len(run_blocks) == 3 and "ray job submit" in run_blocks[1] and "stop.sh" in stop_block
    stack = Stack(tmp_path)
    quick, synth_clip = (
        "--space search_spaces/quick.yaml",
        "--data ~/.mg-ray/datasets/synth s04_000",
    )
    assert quick in run_blocks[1] and synth_clip in run_blocks[2]
    stand_in = tmp_path / "quick.yaml"  # study name: the file's stem, as the README's
    stand_in.write_text(TINY_QUICK)
    clip = load_index(tiny_dataset).split("test")[0].frame_dir
    ours = lambda text: (
        text.replace("http://127.0.0.1:8265", stack.dashboard)
        .replace(synth_clip, f"--data {tiny_dataset} {clip}")
        .replace("~/.mg-ray", str(stack.home))
        .replace(quick, f"--space {stand_in} --data {tiny_dataset}")
    )
    script = "set -euo pipefail\n" + "\n".join(ours(block) for block in run_blocks)
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            check=False,
            env=stack.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-8000:]
        assert "succeeded" in output and "Trial status" in output  # the job log's progress table
        assert "registered model mg-ray-fused version 1" in output
        # the by-hand promotion of the same best trial registers nothing new
        assert (
            "already registered as mg-ray-fused version 1" in output
            and "Created version '2'" not in output
        )
        assert "true class" in output  # the prediction

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
        experiment = client.get_experiment_by_name("mg-ray")
        [parent] = client.search_runs([experiment.experiment_id], "tags.`mg_ray.role` = 'study'")
        children = client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert parent.info.status == "FINISHED" and len(children) == 1  # one trial
        assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
        assert {c.data.tags["mg_ray.trial_state"] for c in children} <= {"completed", "stopped"}
        champion = client.get_model_version_by_alias("mg-ray-fused", "champion")
        assert str(champion.version) == "1" and champion.tags["study"] == "quick"
        assert str(client.get_model_version_by_alias("mg-ray-fused", "candidate").version) == "1"
        assert len(client.search_model_versions("name = 'mg-ray-fused'")) == 1
        # Outputs in the stack's stable home, not in the job's temporary working dir.
        assert (stack.home / "optuna.db").is_file()
        assert list((stack.home / "ray_results").glob("quick_train/*/checkpoint_*"))
        ray_pgid, mlflow_pgid = stack.pid("ray-head.pid"), stack.pid("mlflow.pid")
    finally:
        stopped = subprocess.run(
            ["bash", "-c", ours(stop_block)],
            check=False,
            env=stack.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        shutil.rmtree(stack.ray_temp, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 10
    while (group_pids(ray_pgid) | group_pids(mlflow_pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_pids(ray_pgid) | group_pids(mlflow_pgid)
    assert not any(port_open(stack.ports[name]) for name in ("RAY", "DASHBOARD", "MLFLOW"))


def ray_job_stop_interrupts_the_study_and_resubmitting_resumes_it(
    stack, tiny_dataset, tmp_path
) -> None:
    """`ray job stop` (SIGTERM to the job's driver, SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, which
    the README's submit raises to 60 s) is an interruption: the job ends STOPPED, the study run
    KILLED, its trial `interrupted`, nothing registered; the same job submitted again resumes the
    trial and completes the study."""
    from mlflow import MlflowClient

    space = tmp_path / "stopped.yaml"
    # (20 epochs: an epoch takes under a second here, and `ray job stop` must find it training)
    space.write_text(
        TINY_QUICK.replace("optim.epochs: 1", "optim.epochs: 20").replace("[1]", "[20]")
    )
    env = stack.client_env()

    def submit(submission_id: str, *wait: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "ray",
                "job",
                "submit",
                *wait,
                "--address",
                stack.dashboard,
                "--submission-id",
                submission_id,
                "--working-dir",
                ".",
                "--runtime-env-json",
                '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}',
                "--",
                "python",
                "jobs/tune.py",
                "--space",
                str(space),
                "--data",
                str(tiny_dataset),
            ],
            check=False,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def job(*args: str) -> str:
        return subprocess.run(
            ["ray", "job", *args, "--address", stack.dashboard],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout

    assert submit("study-job-1", "--no-wait").returncode == 0
    client = MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    deadline = time.monotonic() + 600
    trained = False
    while not trained and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("mg-ray")
        trials = (
            client.search_runs([experiment.experiment_id], "tags.`mg_ray.role` = 'trial'")
            if experiment
            else []
        )
        trained = any(client.get_metric_history(t.info.run_id, "val_top1") for t in trials)
        time.sleep(1)
    assert trained, job("logs", "study-job-1")[-4000:]
    job("stop", "study-job-1")  # waits for the job to end
    logs = job("logs", "study-job-1")
    assert "was stopped" in job("status", "study-job-1"), logs[-4000:]
    assert "study 'stopped' interrupted; run the same command to resume it" in logs, logs[-4000:]
    [parent] = client.search_runs([experiment.experiment_id], "tags.`mg_ray.role` = 'study'")
    [trial] = client.search_runs([experiment.experiment_id], "tags.`mg_ray.role` = 'trial'")
    assert parent.info.status == "KILLED" and trial.info.status == "KILLED"
    assert trial.data.tags["mg_ray.trial_state"] == "interrupted"
    assert not client.search_registered_models()

    again = submit("study-job-2")
    assert again.returncode == 0 and "succeeded" in again.stdout, again.stdout[-6000:]
    assert "resuming study 'stopped'" in again.stdout
    [trial] = client.search_runs([experiment.experiment_id], "tags.`mg_ray.role` = 'trial'")
    assert trial.info.status == "FINISHED" and trial.data.tags["mg_ray.trial_state"] == "completed"
    assert len({m.step for m in client.get_metric_history(trial.info.run_id, "val_top1")}) == 20
    assert client.get_model_version_by_alias("mg-ray-fused", "champion")
