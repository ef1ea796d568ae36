"""MLflow's own serving: the registered champion, served by `mlflow models serve` on 127.0.0.1,
classifies a clip of the synthetic dataset sent as the README's `curl` call sends it (the body
`mg-ray predict --request` writes) and answers what `mg-ray predict` prints; a bad clip is an
HTTP 400 whose message ends with one line naming the clip and the field.

The champion is an untrained small fused model with data settings off the defaults
(`tests/test_serving.py`), logged as a training run's best model and promoted as a study does:
the server cares what the model computes, not how well.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from mg_ray import tracking
from mg_ray.data import load_index
from mg_ray.predict import top5_path
from mg_ray.registry import promote_run
from tests.e2e.helpers import cli_env, run
from tests.test_serving import fused_model_file

pytestmark = pytest.mark.slow

NAME = "mg-ray-fused"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_dataset) -> Path:
    """A store whose registry holds NAME@champion, as after a study."""
    home = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.get_or_create_experiment(client, "mg-ray")
    model_file, _ = fused_model_file(home, tiny_dataset)
    run_id, _ = tracking.start_or_resume_run(client, experiment, "served", run_name="train-fused")
    client.log_artifact(run_id, str(model_file), "best_model")
    client.log_metric(run_id, "val_top1", 0.1, step=0)
    client.log_metric(run_id, "best_val_top1", 0.1)
    client.log_param(run_id, "data.root", str(tiny_dataset))
    tracking.terminate_run(client, run_id, "FINISHED")
    promote_run(run_id, NAME, tracking_uri=uri)
    assert client.get_model_version_by_alias(NAME, "champion").run_id == run_id
    return home


@pytest.fixture(scope="module")
def server(home):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` (README's command) in
    its own process group, stopped by that group's id."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the README activates the venv: its tools on PATH
    env = cli_env(home) | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # mlflow runs uvicorn
    }
    log = open(home / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (home / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (home / "serve.log").read_text()[-4000:]
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the server died
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def post(url: str, body: Path) -> tuple[int, dict]:
    """POST a JSON body to /invocations as the README's curl call does (with curl when the
    machine has it, else urllib)."""
    if shutil.which("curl"):
        done = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]
            + ["-d", f"@{body}", f"{url}/invocations"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        text, status = done.stdout.rsplit("\n", 1)
        return int(status), json.loads(text)
    request = urllib.request.Request(
        f"{url}/invocations", body.read_bytes(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_served_champion_classifies_a_clip_as_mg_ray_predict_does(
    home, server, tiny_dataset, tmp_path
):
    clip = load_index(tiny_dataset).split("test")[0].frame_dir
    body = tmp_path / "request.json"
    run(home, "predict", "--data", str(tiny_dataset), clip, "--request", str(body))
    status, answer = post(server, body)
    assert status == 200, answer
    [served] = answer["predictions"]
    assert set(served) == {"label", "class_name", "top5", "probabilities"}

    printed = run(
        home, "predict", "--model", f"models:/{NAME}@champion", "--data", str(tiny_dataset), clip
    ).stdout
    lines = [line.split() for line in printed.splitlines()[1:]]
    assert [int(k) for _, k, _ in lines] == served["top5"]
    assert [float(p) for p, _, _ in lines] == [
        round(served["probabilities"][k], 3) for k in served["top5"]
    ]
    assert lines[0][2] == served["class_name"] and served["label"] == served["top5"][0]


def test_a_bad_clip_is_a_400_naming_the_clip_and_the_field(home, server, tiny_dataset, tmp_path):
    clip = load_index(tiny_dataset).split("test")[0].frame_dir
    good = tmp_path / "good.json"
    run(home, "predict", "--data", str(tiny_dataset), clip, "--request", str(good))
    request = json.loads(good.read_text())
    request["dataframe_split"]["data"][0][0] = base64.b64encode(b"not a video").decode()
    request["dataframe_split"]["data"][0][2] = "broken"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(request))
    status, answer = post(server, bad)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    # MLflow's scoring server puts "Failed to predict data '<the request's table>'." before the
    # model's message; the model's own is the last line, one line naming the clip and the field
    last = answer["message"].splitlines()[-1]
    assert last.startswith("Error: clip 'broken': video: cannot open video"), answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]


def test_a_split_on_ray_data_equals_the_one_process_path(home, tiny_dataset, tmp_path):
    """`--split` runs on Ray Data (here a private local cluster of this machine's CPUs, two
    model-holding actors); the MiGA submission and its top-5 file are those of `--serial`."""
    model = f"models:/{NAME}@champion"
    written = {}
    for how in ("--serial", "--actors=2"):
        submission = tmp_path / f"{how.strip('-').split('=')[0]}.zip"
        out = run(
            home, "predict", "--model", model, "--data", str(tiny_dataset), "--split", "test",
            "--submission", str(submission), how,
        )  # fmt: skip
        with zipfile.ZipFile(submission) as archive:
            lines = archive.read("Submission.csv").decode()
        written[how] = (lines, top5_path(submission).read_text())
        assert "Submission.csv with 10 clips" in out.stdout
    assert written["--serial"] == written["--actors=2"]
    names = [line.split(",")[0] for line in written["--serial"][0].splitlines()]
    assert names == [a.frame_dir for a in load_index(tiny_dataset).split("test")]  # clip order
