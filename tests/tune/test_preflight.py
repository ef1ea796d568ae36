"""Bad input is a clear one-line error before anything expensive starts: search-space files
(unknown parameters, empty ranges, wrong types, impossible constraints), a missing dataset or split,
a relative dataset path, an unwritable home or MLflow store, an unreachable MLflow server, an
infeasible resource request (all before Ray starts), and a model or run that the store does not
hold (`mg-ray predict`, `mg-ray promote`)."""

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
    "unknown parameter": (
        "loss.gamma: {type: float, low: 0.1, high: 0.5}",
        "loss.gamma: unknown key",
    ),
    "empty range": ("loss.alpha: {type: float, low: 0.5, high: 0.5}", "greater than low=0.5"),
    "wrong type": ("loss.alpha: {type: float, low: a, high: 0.5}", "expected a number, got 'a'"),
    "unknown type": ("loss.alpha: {type: gaussian, low: 0.1, high: 0.5}", "loss.alpha.type"),
    "log of zero": ("optim.lr: {type: float, low: 0.0, high: 0.1, log: true}", "optim.lr"),
    "impossible frames": (
        "data.pose_frames: {type: categorical, choices: [12]}",
        "impossible constraint",
    ),
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


def tune(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mg_ray.cli", "tune", *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**cli_env(tmp_path / "home"), **(env or {})},
    )


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
    done = tune(
        tmp_path, "--space", "search_spaces/quick.yaml", "--data", str(tmp_path / "nowhere")
    )
    assert done.returncode == 2 and "nowhere" in done.stderr and "does not exist" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path, tiny_dataset):
    uri = f"http://127.0.0.1:{free_port()}"
    done = tune(
        tmp_path,
        "--space",
        "search_spaces/quick.yaml",
        "--data",
        str(tiny_dataset),
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert done.returncode == 2 and uri in done.stderr and "cannot be reached" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_infeasible_resources_are_refused_before_ray_starts(tmp_path, tiny_dataset):
    space = space_file(
        tmp_path,
        "loss.alpha: {type: float, low: 0.1, high: 0.5}",
        fixed="resources.cpus_per_worker: 64",
    )
    done = tune(tmp_path, "--space", str(space), "--data", str(tiny_dataset))
    assert done.returncode == 2 and "needs 128.1 CPUs" in done.stderr, done.stderr[-3000:]
    assert "a local Ray cluster on this machine has" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def no_ray_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    assert (
        "Traceback" not in done.stderr
        and "Started a local Ray instance" not in done.stdout + done.stderr
    )


def test_unwritable_home_and_store_are_refused_before_ray_starts(tmp_path, tiny_dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = tune(
        tmp_path,
        "--space",
        "search_spaces/quick.yaml",
        "--data",
        str(tiny_dataset),
        env={"MG_RAY_HOME": str(blocker / "home")},
    )
    no_ray_one_line_error(done, str(blocker / "home"), "Set MG_RAY_HOME")
    done = tune(
        tmp_path,
        "--space",
        "search_spaces/quick.yaml",
        "--data",
        str(tiny_dataset),
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{blocker}/mlflow.db"},
    )
    no_ray_one_line_error(
        done, f"MLflow store sqlite:///{blocker}/mlflow.db", "cannot create folder"
    )


def test_a_split_the_dataset_lacks_and_a_relative_path_are_refused_before_ray_starts(
    tmp_path, tiny_dataset
):
    space = space_file(
        tmp_path, "loss.alpha: {type: float, low: 0.1, high: 0.5}", fixed="data.val_split: dev"
    )
    done = tune(tmp_path, "--space", str(space), "--data", str(tiny_dataset))
    no_ray_one_line_error(
        done, "data.val_split: no split 'dev'", "the annotations have test, train, val"
    )
    done = tune(tmp_path, "--space", "search_spaces/quick.yaml", "--data", "relative/data")
    no_ray_one_line_error(done, "data.root: relative/data is a relative path")


def test_a_model_or_run_the_store_lacks_is_a_one_line_error(tmp_path, tiny_dataset):
    env = cli_env(tmp_path / "home")
    cli = [sys.executable, "-m", "mg_ray.cli"]
    done = subprocess.run(
        [*cli, "predict", "--model", "models:/nope@champion", "--data", str(tiny_dataset), "x"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    no_ray_one_line_error(
        done, "models:/nope@champion: no registered model 'nope'", "registered: none"
    )
    done = subprocess.run(
        [*cli, "promote", "--run", "0123abcd"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    no_ray_one_line_error(done, "run '0123abcd': no such MLflow run")
    done = subprocess.run(
        [*cli, "promote", "--study", "nope"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    no_ray_one_line_error(done, "study 'nope': no trial runs")
