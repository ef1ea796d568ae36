"""End to end: the paper's recipe as one resumable pipeline (`jobs/tune.py` with a `stages` file)
on a real local Ray cluster, a real sqlite MLflow store and the tiny synthetic dataset.

One run of the test: the pipeline's driver is killed (SIGKILL) during the fused stage; the same
command resumes it (the single-stream stages are not run again, the fused stage ends with exactly
its trial count, one child run per trial); then the tree (pipeline -> stages -> trials, and the
ensemble), the init lineage on the fused trials and on the registered version; and a third run
of the same command trains nothing new and registers nothing new.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.helpers import alive, mlflow_client, no_train_workers_left, run, runs, start

pytestmark = pytest.mark.slow

PIPELINE = """\
base: small
fixed:
  optim.epochs: 1
  optim.milestones: [1]
  optim.warmup_epochs: 0
  resources.num_workers: 1
  resources.cpus_per_worker: 0.9
  data.test_clips: 1
study:
  seed: 0
  trial_driver_cpus: 0.05
  register_as: pipeline-model
stages:
  rgb:
    modality: rgb
    study: {num_trials: 1}
  pose:
    modality: pose
    study: {num_trials: 1}
  fused:
    modality: rgbpose
    init: {rgb: rgb, pose: pose}
    fixed: {optim.epochs: 6, optim.milestones: [6]}
    study: {num_trials: 2, asha: {grace_period: 6}}
    parameters:
      optim.lr: {type: float, low: 0.001, high: 0.01, log: true}
ensemble:
  members: [rgb, pose, fused]
"""


def stage_runs(client, pipeline_run_id: str) -> dict[str, object]:
    return {
        r.data.tags["mg_ray.stage"]: r
        for r in runs(client, f"tags.`mlflow.parentRunId` = '{pipeline_run_id}'")
        if r.data.tags.get("mg_ray.role") == "study"
    }


def children(client, run_id: str) -> list:
    return runs(client, f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_pipeline_killed_in_the_fused_stage_resumes_and_keeps_its_lineage(tiny_dataset, tmp_path):
    home = tmp_path / "home"
    space = tmp_path / "recipe.yaml"
    space.write_text(PIPELINE)
    args = ("tune", "--space", str(space), "--data", str(tiny_dataset))
    client = mlflow_client(home)

    # 1. Kill the driver once the fused stage has a trial with an epoch in.
    proc = start(home, *args, log=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            fused = (
                runs(
                    client, "tags.`mg_ray.study` = 'recipe.fused' and tags.`mg_ray.role` = 'trial'"
                )
                if (home / "mlflow.db").exists()
                else []
            )
            if fused and client.get_metric_history(fused[0].info.run_id, "val_top1"):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (
            "the pipeline ended first:\n" + (tmp_path / "first.log").read_text()[-4000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not alive(proc.pid)
    [pipeline] = runs(client, "tags.`mg_ray.role` = 'pipeline'")
    before = stage_runs(client, pipeline.info.run_id)
    assert before["rgb"].info.status == before["pose"].info.status == "FINISHED"
    single = {stage: children(client, before[stage].info.run_id) for stage in ("rgb", "pose")}
    assert [len(c) for c in single.values()] == [1, 1]

    # 2. The same command: the single-stream stages are not run again, the fused stage resumes.
    done = run(home, *args, timeout=900)
    for stage in ("rgb", "pose"):
        assert f"stage {stage}: completed before" in done.stdout, done.stdout[-3000:]
    [pipeline] = runs(client, "tags.`mg_ray.role` = 'pipeline'")
    assert pipeline.info.status == "FINISHED"
    stages = stage_runs(client, pipeline.info.run_id)
    assert set(stages) == {"rgb", "pose", "fused"}
    for stage in ("rgb", "pose"):
        [trial] = children(client, stages[stage].info.run_id)
        [earlier] = single[stage]
        assert (
            trial.info.run_id == earlier.info.run_id
            and trial.info.end_time == earlier.info.end_time
        )
    fused = children(client, stages["fused"].info.run_id)
    assert len(fused) == 2 == len({t.data.tags["mg_ray.trial_id"] for t in fused})
    assert all(
        t.info.status in ("FINISHED", "KILLED")
        and t.data.tags["mg_ray.trial_state"] in ("completed", "stopped")
        for t in fused
    )
    assert no_train_workers_left(home)

    # Lineage: every fused trial, and the registered version, name the runs they started from.
    rgb_run, pose_run = (
        children(client, stages[s].info.run_id)[0].info.run_id for s in ("rgb", "pose")
    )
    for trial in fused:
        assert (
            trial.data.tags["mg_ray.init.rgb_run"] == rgb_run
            and trial.data.tags["mg_ray.init.pose_run"] == pose_run
        )
        assert trial.data.params["model.rgb_init"] == f"runs:/{rgb_run}"
    version = client.get_model_version_by_alias("pipeline-model", "champion")
    assert version.run_id in {t.info.run_id for t in fused}
    assert (
        version.tags["mg_ray.init.rgb_run"] == rgb_run
        and version.tags["mg_ray.init.pose_run"] == pose_run
    )
    assert version.tags["pipeline"] == "recipe" and version.tags["study"] == "recipe.fused"
    assert (
        float(version.tags["test_top1"]) >= 0
        and version.tags["champion_decision"] == "no champion before"
    )

    # The ensemble: a run of its own under the pipeline's, each member's scores beside its own.
    [ensemble] = [
        r
        for r in children(client, pipeline.info.run_id)
        if r.data.tags.get("mg_ray.role") == "ensemble"
    ]
    assert {f"val_top1_{m}" for m in ("rgb", "pose", "fused")} | {"val_top1", "test_top1"} <= set(
        ensemble.data.metrics
    )

    # 3. Once more: nothing new is trained, logged or registered.
    count = len(runs(client))
    again = run(home, *args, timeout=600)
    assert all(f"stage {s}: completed before" in again.stdout for s in ("rgb", "pose", "fused")), (
        again.stdout[-3000:]
    )
    assert "ensemble: logged before" in again.stdout
    assert len(runs(client)) == count
    assert len(client.search_model_versions("name = 'pipeline-model'")) == 1
