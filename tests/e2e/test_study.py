"""End to end: the study (`jobs/tune.py`) on a real local Ray cluster with a real sqlite MLflow
store, on the tiny synthetic dataset, then promotion and prediction from the registry.

A 2-trial study (a single-stage space file): one parent run, exactly one child per trial, all
terminated, states that match what ran; the parent's summary artifacts; version 1 registered with
`candidate` and `champion`, its lineage, data and test tags. On the same data, a worse model
registered by hand does not take `champion` and a better one does; on another dataset the
champion is re-evaluated there first. `mg-ray predict`, `mlflow.pyfunc.load_model` and the
ensemble work from the registry and the study.

The other endings of a study are in tests/e2e/test_study_endings.py; a driver killed with SIGKILL
and resumed by the same command, in tests/e2e/test_pipeline.py (a pipeline's stage is a study).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.helpers import (
    artifact_paths,
    epochs_logged,
    mlflow_client,
    no_train_workers_left,
    run,
    runs,
)

pytestmark = pytest.mark.slow

TINY_SPACE = """\
base: small
fixed:
  optim.epochs: {epochs}
  optim.milestones: [{epochs}]
  optim.warmup_epochs: 0
  resources.num_workers: {workers}
  resources.cpus_per_worker: 0.9
  data.test_clips: 1
study:
  num_trials: {trials}
  metric: val_top1
  mode: max
  seed: 0
  trial_driver_cpus: 0.1
  register_as: tiny-model
  asha: {{grace_period: {grace}, reduction_factor: 2}}
parameters:
  loss.alpha: {{type: float, low: 0.05, high: 0.5, log: true}}
  loss.tau: {{type: float, low: 0.05, high: 0.5, log: true}}
  loss.rho: {{type: float, low: 0.8, high: 0.99}}
  optim.lr: {{type: float, low: 0.01, high: 0.1, log: true}}
  data.rgb_frames: {{type: categorical, choices: [4, 8]}}
  data.pose_frames: {{type: categorical, choices: [8, 16]}}
"""


def write_space(
    folder: Path, *, trials: int, epochs: int, workers: int = 2, grace: int = 1
) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY_SPACE.format(trials=trials, epochs=epochs, workers=workers, grace=grace))
    return path


def study_runs(client, study: str) -> tuple[object, list]:
    [parent] = runs(client, f"tags.`mg_ray.role` = 'study' and tags.`mg_ray.study` = '{study}'")
    children = runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def check_children(client, children: list, epochs: int) -> None:
    """Every child terminated, tagged with its trial id, and its state matches what it ran.

    A stopped trial's run holds the epochs Tune saw (`mg_ray.trial_epochs`): the controller logs
    nothing into a run the study driver has ended, though a report racing that end can add one."""
    assert len({c.data.tags["mg_ray.trial_id"] for c in children}) == len(children)
    for child in children:
        ran = epochs_logged(client, child.info.run_id)
        state, seen = (
            child.data.tags["mg_ray.trial_state"],
            int(child.data.tags["mg_ray.trial_epochs"]),
        )
        assert child.info.status != "RUNNING" and child.info.end_time
        if state == "completed":
            assert child.info.status == "FINISHED" and ran == seen == epochs, (ran, seen)
        else:
            assert state == "stopped" and child.info.status == "FINISHED", state
            assert child.data.tags["mg_ray.stop_reason"] == "asha"
            assert 1 <= seen < epochs and seen <= ran <= seen + 1, (seen, ran)


def test_study_run_tree_registry_promotion_and_predict(tiny_dataset, tmp_path):
    home = tmp_path / "home"
    # 2 epochs, so that a trial's best epoch may not be its last; no ASHA stop (its first rung at
    # the last epoch), so both complete (tests/e2e/test_study_endings.py has ASHA stopping one)
    space = write_space(tmp_path, trials=2, epochs=2, grace=2)
    done = run(
        home,
        "tune",
        "--space",
        str(space),
        "--study",
        "s1",
        "--data",
        str(tiny_dataset),
        timeout=900,
    )
    assert "Trial status" in done.stdout  # Tune's progress table
    assert "best trial" in done.stdout and "registered model tiny-model version 1" in done.stdout
    assert "mlflow ui --backend-store-uri" in done.stdout

    client = mlflow_client(home)
    parent, children = study_runs(client, "s1")
    check_mlflow_view(home, client, done.stdout, parent, children)
    assert parent.info.status == "FINISHED" and len(children) == 2
    check_children(client, children, epochs=2)
    assert {c.data.tags["mg_ray.study"] for c in children} == {"s1"}
    files = artifact_paths(client, parent.info.run_id)
    assert {"study/trials.csv", "study/best_config.yaml", "study/optuna_plots.html"} <= files
    assert parent.data.params["search.optim.lr"] == "float [0.01, 0.1] log"  # the ranges searched

    # Registry: version 1 with both aliases and its lineage.
    v1 = client.get_model_version_by_alias("tiny-model", "champion")
    assert str(v1.version) == "1" and set(v1.aliases) == {"candidate", "champion"}
    best_run = client.get_run(v1.run_id)
    assert best_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert v1.tags["study"] == "s1" and v1.tags["trial"] == best_run.data.tags["mg_ray.trial_id"]
    assert v1.tags["run_id"] == v1.run_id and len(v1.tags["git_commit"]) >= 7
    assert v1.tags["dataset_fingerprint"] not in ("", "unknown")
    champion_score = float(v1.tags["val_top1"])
    check_one_objective(home, client, parent, children, v1)
    check_optuna_dashboard(home, "s1", num_trials=2, best_run_id=v1.run_id, best=champion_score)
    assert no_train_workers_left(home)

    # Guarded promotion, on the same data: a copy of the best model claiming a worse score stays
    # `candidate`; one claiming a better score becomes `champion`. The version says which data it
    # was scored on and carries its test top-1, which decides nothing.
    assert v1.tags["val_split"] == "val" and float(v1.tags["test_top1"]) >= 0
    model_file = client.download_artifacts(v1.run_id, "best_model/model.pt", str(tmp_path))
    experiment_id = parent.info.experiment_id

    def fake_run(score: float, data) -> str:
        fake = client.create_run(experiment_id, run_name=f"manual{score:.2f}")
        client.log_artifact(fake.info.run_id, model_file, "best_model")
        client.log_metric(fake.info.run_id, "best_val_top1", score)
        client.log_param(fake.info.run_id, "data.root", str(data))
        client.log_param(fake.info.run_id, "data.val_split", "val")
        client.set_terminated(fake.info.run_id)
        return fake.info.run_id

    for delta, expect_champion in ((-0.5, "1"), (+0.5, "3")):
        out = run(
            home,
            "promote",
            "--run",
            fake_run(champion_score + delta, tiny_dataset),
            "--name",
            "tiny-model",
        )
        assert (
            str(client.get_model_version_by_alias("tiny-model", "champion").version)
            == expect_champion
        ), out.stdout
        assert ("champion stays version 1" in out.stdout) == (delta < 0)
        decision = client.get_model_version(
            "tiny-model", str(len(client.search_model_versions("name = 'tiny-model'")))
        )
        assert "compared on the same data" in decision.tags["champion_decision"]
    # On another dataset (same clips, another fingerprint), the recorded scores do not decide: the
    # champion (version 3, recorded at champion_score + 0.5) is re-evaluated there first and
    # scores what the model really does, so a claim of champion_score + 0.1 beats it.
    other = tmp_path / "other-data"
    shutil.copytree(tiny_dataset, other)
    meta = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**meta, "fingerprint": "another-dataset"}))
    out = run(
        home, "promote", "--run", fake_run(champion_score + 0.1, other), "--name", "tiny-model"
    )
    v4 = client.get_model_version("tiny-model", "4")
    assert (
        "champion re-evaluated on this version's validation split" in v4.tags["champion_decision"]
    ), out.stdout
    assert (
        f"champion's {champion_score:.4f}" in v4.tags["champion_decision"]
    )  # the model's real score
    assert str(client.get_model_version_by_alias("tiny-model", "champion").version) == "4"
    latest = client.get_model_version_by_alias("tiny-model", "candidate")
    assert str(latest.version) == "4"
    # Promoting an already registered run again registers nothing and moves no alias.
    out = run(home, "promote", "--run", v1.run_id, "--name", "tiny-model")
    assert "already registered as tiny-model version 1" in out.stdout, out.stdout
    assert len(client.search_model_versions("name = 'tiny-model'")) == 4
    assert {
        a: str(client.get_model_version_by_alias("tiny-model", a).version)
        for a in ("candidate", "champion")
    } == {"candidate": "4", "champion": "4"}
    # Running the finished study again trains nothing, adds no child run, registers nothing.
    again = run(
        home,
        "tune",
        "--space",
        str(space),
        "--study",
        "s1",
        "--data",
        str(tiny_dataset),
        timeout=600,
    )
    assert "best model already registered as tiny-model version 1" in again.stdout, again.stdout[
        -3000:
    ]
    assert len(client.search_model_versions("name = 'tiny-model'")) == 4
    assert len(study_runs(client, "s1")[1]) == 2

    # Predict from the registry: the CLI and plain MLflow pyfunc.
    from mg_ray.data import load_index

    clip = load_index(tiny_dataset).split("test")[0].frame_dir
    out = run(
        home, "predict", "--model", "models:/tiny-model@champion", "--data", str(tiny_dataset), clip
    )
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 5 and sum(float(p) for p, *_ in lines) <= 1.0 + 1e-6
    assert all(float(a[0]) >= float(b[0]) for a, b in itertools.pairwise(lines))  # sorted

    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{home / 'mlflow.db'}")  # whatever an earlier test set
    model = mlflow.pyfunc.load_model("models:/tiny-model@champion")
    index = load_index(tiny_dataset)
    ann = index.split("test")[0]
    skeleton = {"keypoint": ann.keypoint, "keypoint_score": ann.keypoint_score}
    [row] = model.predict(
        pd.DataFrame({"video": [str(index.video_path(clip))], "skeleton": [skeleton]})
    ).to_dict(orient="records")
    assert np.isclose(sum(row["probabilities"]), 1.0, atol=1e-4)
    # plain MLflow classifies the clip as `mg-ray predict` printed it (3 decimals)
    assert [int(k) for _, k, *_ in lines] == row["top5"]
    assert [float(p) for p, *_ in lines] == [round(row["probabilities"][k], 3) for k in row["top5"]]

    # The paper's last step: an ensemble of the study's runs, logged as a run; its first member
    # is the registered trial (the one rule for the best trial).
    out = run(home, "ensemble", "--study", "s1", "--top", "2")
    [ensemble] = runs(client, "tags.`mg_ray.role` = 'ensemble'")
    assert ensemble.data.tags["mg_ray.members"].split(",")[0] == v1.run_id, out.stdout


def check_one_objective(home: Path, client, parent, children, version) -> None:
    """A trial's score is its best epoch's val_top1 (the model it would register), and the same
    number everywhere: Tune's last result, ASHA's input (the same results), Optuna's trial value,
    the trial run's `best_val_top1`, the study run's best, the registered version's tag and the
    ensemble's first member."""
    from ray import tune

    last_results = tune.ExperimentAnalysis(str(home / "ray_results" / "s1")).results
    study = optuna_study(home, "s1")
    optuna_values = {t.user_attrs["tune_trial_id"]: t.value for t in study.trials}
    scores = {}
    for child in children:
        trial_id, score = child.data.tags["mg_ray.trial_id"], child.data.metrics["best_val_top1"]
        epochs = client.get_metric_history(child.info.run_id, "val_top1")
        assert score == max(m.value for m in epochs)  # the best epoch's, not the last one's
        assert last_results[trial_id]["best_val_top1"] == score == optuna_values[trial_id]
        scores[child.info.run_id] = score
    completed = [c for c in children if c.data.tags["mg_ray.trial_state"] == "completed"]
    # the best score; a tie (likely on the tiny dataset) goes to the trial Optuna drew first,
    # which every trial run names
    numbers = {c.info.run_id: int(c.data.tags["mg_ray.optuna_trial"]) for c in children}
    assert sorted(numbers.values()) == list(range(len(children)))
    best = min(completed, key=lambda c: (-c.data.metrics["best_val_top1"], numbers[c.info.run_id]))
    assert version.run_id == best.info.run_id == parent.data.tags["best_run_id"]
    assert (
        float(version.tags["val_top1"])
        == parent.data.metrics["best_val_top1"]
        == scores[best.info.run_id]
        == study.best_value
    )


def optuna_study(home: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}")


def check_mlflow_view(home: Path, client, stdout: str, parent, children) -> None:
    """The study as MLflow's users see it: what every trial run carries (dataset input, source
    tags, a logged model, system metrics), the study run's progress chart, and the printed link
    loaded in headless Chromium from `mlflow ui` on 127.0.0.1: the model-training runs view, the
    study run listed with its trials nested under it."""
    import re

    for child in children:
        run_ = client.get_run(child.info.run_id)
        contexts = {i.tags[0].value for i in run_.inputs.dataset_inputs}
        assert contexts == {"training", "validation", "test"}, contexts
        assert run_.data.tags["mlflow.source.name"] and "mlflow.source.git.commit" in run_.data.tags
        assert [o.model_id for o in run_.outputs.model_outputs], child.info.run_id
        assert any(k.startswith("system/cpu_utilization") for k in run_.data.metrics), sorted(
            run_.data.metrics
        )
    v1 = client.get_model_version("tiny-model", "1")
    best = client.get_run(v1.run_id)
    assert (
        v1.source == f"models:/{best.outputs.model_outputs[0].model_id}"
    )  # the version is the run's logged model
    history = client.get_metric_history(parent.info.run_id, "best_so_far_val_top1")
    assert [m.step for m in history] == [1, 2] and history[1].value >= history[0].value
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    link = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", stdout)
    assert link, stdout[-2000:]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium not installed (.ci/run installs Debian's chromium)")
    port = free_port()
    url = link.group(1).replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    assert "workflowType=machine_learning" in url
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    experiment_id, best_run_id = parent.info.experiment_id, parent.data.tags["best_run_id"]
    study_page = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=90)
        # Each page is dumped again until what it is checked for has rendered: on a loaded
        # machine the UI may still be fetching when the dump is taken (the artifact view says
        # "Artifact loading" while it reads the 4.6 MB page of plots).
        dom = dump_dom(chromium, home, url, until='col-id="metrics.`best_val_top1`"')
        page = dump_dom(chromium, home, study_page, until="Best trial")
        artifact = dump_dom(
            chromium,
            home,
            f"{study_page}/artifacts/study/optuna_plots.html",
            until="mlflow-html-iframe",
        )
        model_id = client.get_run(best_run_id).outputs.model_outputs[0].model_id
        model_page = dump_dom(
            chromium,
            home,
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/models/{model_id}",
            until="#/models/tiny-model/versions/1",
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert 'col-id="attributes.`Run Name`"' in dom, dom[:2000]  # the runs table, not traces
    # The printed link opens the study's trials with the columns to compare them by: the
    # objective, how each ended, the searched parameters (a shared view of the experiment).
    for col in ("metrics.`best_val_top1`", "tags.`mg_ray.trial_state`", "params.`optim.lr`"):
        assert f'col-id="{col}"' in dom, (col, dom[-3000:])
    best_first = sorted(children, key=lambda c: -c.data.metrics["best_val_top1"])
    where = [dom.find(f'runs/{c.info.run_id}"') for c in best_first]
    assert all(i >= 0 for i in where), where  # every trial listed
    assert f'runs/{parent.info.run_id}"' not in dom  # the study run is not a trial
    # The study run's page: its description links the best trial; its Optuna plots are an HTML
    # artifact the UI renders (in an iframe, scripts allowed), and plotly draws them.
    assert f'href="#/experiments/{experiment_id}/runs/{best_run_id}"' in page, page[-3000:]
    assert "Best trial" in page
    assert "mlflow-html-iframe" in artifact, artifact[-3000:]
    # The registered version shows on its logged model's page, which is named after its trial.
    assert 'href="#/models/tiny-model/versions/1"' in model_page, model_page[-3000:]
    assert "Not registered" not in model_page and "s1_" in model_page
    plots = client.download_artifacts(parent.info.run_id, "study/optuna_plots.html", str(home))
    drawn = dump_dom(chromium, home, Path(plots).as_uri())
    assert drawn.count("js-plotly-plot") >= 2 and "parcoords" in drawn, drawn[:2000]


def dump_dom(chromium: str, home: Path, url: str, until: str = "", patience_s: float = 180) -> str:
    """The DOM of `url` once headless Chromium has run its scripts (20 s of virtual time), taken
    again while it lacks `until`, for up to `patience_s` seconds; the last dump is returned. On
    a loaded machine a dump can end after a few seconds with the page still fetching (three
    tries, then five, ran out that way in CI), so the patience is counted in seconds."""
    deadline = time.monotonic() + patience_s
    while True:
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--window-size=2400,1400",  # wide: the runs table renders only the columns in view
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={home / 'chromium'}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        ).stdout
        if until in dom or time.monotonic() > deadline:
            return dom


def check_optuna_dashboard(
    home: Path, study: str, num_trials: int, best_run_id: str, best: float
) -> None:
    """optuna-dashboard (the `dashboard` extra) serves the study's Optuna storage: its HTTP API on
    127.0.0.1 lists the study and its trials, names the objective, has the best trial MLflow
    has (the same run, the same value) with a link to its run, and the frame counts as one
    parameter each."""
    import threading
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    httpd = make_server(
        "127.0.0.1",
        0,
        optuna_dashboard.wsgi(f"sqlite:///{home / 'optuna.db'}"),
        handler_class=Quiet,
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=30).read())[
            "study_summaries"
        ]
        [found] = [x for x in studies if x["study_name"] == study]
        detail = json.loads(
            urllib.request.urlopen(
                f"{base}/api/studies/{found['study_id']}?after=0", timeout=30
            ).read()
        )
        assert len(detail["trials"]) == num_trials, detail.keys()
        assert detail["objective_names"] == ["best_val_top1"]
        [top] = detail["best_trials"]
        attrs = {a["key"]: a["value"] for a in top["user_attrs"]}
        assert top["values"] == [best] and attrs["mlflow_run_id"] == best_run_id, attrs
        assert attrs["mlflow_run_url"].endswith(
            f"/runs/{best_run_id}?workflowType=machine_learning"
        )
        names = {p["name"] for p in detail["union_search_space"]}
        assert {"data.rgb_frames", "data.pose_frames"} <= names, names
        assert not any("|" in n for n in names), names
    finally:
        httpd.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
