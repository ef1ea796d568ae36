"""Bad input to a study is a clear error before any trial starts: search-space files (unknown
parameters, empty ranges, wrong types, impossible constraints), a missing dataset, an unreachable
MLflow server (these three before Ray even starts) and an infeasible resource request."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mg_ray.config import ConfigError
from mg_ray.tune.space import load_space
from tests.e2e.helpers import ROOT, cli_env

BAD_SPACES = {
    "unknown parameter": ("loss.gamma: {type: float, low: 0.1, high: 0.5}", "loss.gamma: unknown key"),
    "empty range": ("loss.alpha: {type: float, low: 0.5, high: 0.5}", "greater than low=0.5"),
    "wrong type": ("loss.alpha: {type: float, low: a, high: 0.5}", "expected a number, got 'a'"),
    "unknown type": ("loss.alpha: {type: gaussian, low: 0.1, high: 0.5}", "loss.alpha.type"),
    "log of zero": ("optim.lr: {type: float, low: 0.0, high: 0.1, log: true}", "optim.lr"),
    "impossible frames": ("data.pose_frames: {type: categorical, choices: [12]}", "impossible constraint"),
}


def space_file(folder: Path, parameter: str, fixed: str = "data.rgb_frames: 8") -> Path:
    path = folder / "space.yaml"
    path.write_text(f"base: small\nfixed:\n  {fixed}\nparameters:\n  {parameter}\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_is_refused_naming_the_parameter(case, tmp_path):
    parameter, message = BAD_SPACES[case]
    with pytest.raises(ConfigError, match="space.yaml: parameters") as err:
        load_space(space_file(tmp_path, parameter))
    assert message in str(err.value)


def tune(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mg_ray.cli", "tune", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**cli_env(tmp_path / "home"), **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_reports_bad_space_without_traceback(tmp_path):
    done = tune(tmp_path, "--space", str(space_file(tmp_path, BAD_SPACES["unknown parameter"][0])))
    assert done.returncode == 2
    assert "mg-ray tune: error:" in done.stderr and "loss.gamma: unknown key" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_dataset_is_refused_before_ray_starts(tmp_path):
    done = tune(tmp_path, "--space", "search_spaces/quick.yaml", "--data", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "nowhere" in done.stderr and "does not exist" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path, tiny_dataset):
    uri = f"http://127.0.0.1:{free_port()}"
    done = tune(tmp_path, "--space", "search_spaces/quick.yaml", "--data", str(tiny_dataset),
                env={"MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 2 and uri in done.stderr and "cannot be reached" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


@pytest.mark.slow
def test_infeasible_resources_are_refused_before_any_trial(tmp_path, tiny_dataset):
    space = space_file(tmp_path, "loss.alpha: {type: float, low: 0.1, high: 0.5}",
                       fixed="resources.cpus_per_worker: 64")
    done = tune(tmp_path, "--space", str(space), "--data", str(tiny_dataset))
    assert done.returncode == 2 and "CPU" in done.stderr, done.stderr[-3000:]
    assert "Trial status" not in done.stdout
