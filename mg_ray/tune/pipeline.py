"""The paper's recipe as one resumable study: single-stream stages, then the fused search initialised
from their best runs, then a score ensemble (shared/REFERENCE.md section 7).

    run_pipeline (the driver)
      |- MLflow run of the pipeline (key pipeline/<name>; the file's fingerprint)
      |- for each stage, in order: run_study(<name>.<stage>), its study run nested under the
      |    pipeline's, each trial's run under its stage's; a stage with an `init` starts every
      |    trial from the best runs of the stages it names (their run ids on every trial run)
      |- the ensemble of the member stages' best runs, logged as a run of its own
      |- the best trial of the `register` stage registered, with its lineage

Resuming: a stage whose study run ended FINISHED is not run again; the stage that was interrupted
resumes like any study (`Tuner.restore`); the ensemble is not logged twice. A changed file is
refused (the pipeline's fingerprint), as a changed space is for a study.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mg_ray import tracking
from mg_ray.config import ConfigError, to_dict
from mg_ray.tune.space import Pipeline

SPACE_HASH_TAG = "mg_ray.space_sha256"
PIPELINE_TAG, STAGE_TAG = "mg_ray.pipeline", "mg_ray.stage"


def stage_study(pipeline_name: str, stage: str) -> str:
    return f"{pipeline_name}.{stage}"


def pipeline_fingerprint(pipeline: Pipeline) -> str:
    payload = json.dumps(to_dict(pipeline) | {"source": None}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_pipeline(
    pipeline: Pipeline,
    *,
    name: str,
    data_root: str | None = None,
    storage_path: str | Path | None = None,
    promote: bool = True,
    address: str | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Run (or resume) every stage, the ensemble and the registration; returns a summary with
    each stage's summary under "stages"."""
    from mg_ray.cluster import init_ray
    from mg_ray.tune.results import best_trials
    from mg_ray.tune.study import StudyInterrupted, check_storage, preflight, run_study

    # Every stage's checks before Ray starts: a bad last stage fails now, not after the first.
    checked = {stage: preflight(pipeline.stage_space(stage, {s: "0" * 32 for s in spec.init}),
                                study_name=stage_study(name, stage), data_root=data_root, address=address)
               for stage, spec in pipeline.stages.items()}
    check_storage(storage_path, None)
    first = next(iter(checked.values()))
    tracking_uri, experiment = first.tracking_uri, first.probe.tracking.experiment
    init_ray(address)

    client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment)
    fingerprint = pipeline_fingerprint(pipeline)
    existing = tracking.find_run(client, experiment_id, f"pipeline/{name}")
    if existing is not None and existing.data.tags.get(SPACE_HASH_TAG) != fingerprint:
        raise ConfigError(f"pipeline {name!r} already exists (MLflow run {existing.info.run_id}) with a different "
                          f"definition; resume it with the same space file, or choose another --study name")
    pipeline_run_id, _ = tracking.start_or_resume_run(
        client, experiment_id, f"pipeline/{name}", run_name=name,
        tags={PIPELINE_TAG: name, tracking.ROLE_TAG: "pipeline", SPACE_HASH_TAG: fingerprint,
              "mg_ray.space_file": pipeline.source, "mg_ray.stages": ",".join(pipeline.stages)},
        params={"pipeline.name": name, "pipeline.space": pipeline.source, "pipeline.stages": ",".join(pipeline.stages)},
    )
    summary: dict[str, Any] = {"pipeline": name, "stages": {}, "pipeline_run_id": pipeline_run_id,
                               "data_root": str(first.probe.data.root)}
    best: dict[str, Any] = {}  # stage -> its best completed trial run
    status = "FAILED"
    try:
        for stage, spec in pipeline.stages.items():
            study = stage_study(name, stage)
            init_runs = {stream: best[source].info.run_id for stream, source in spec.init.items()}
            stage_run = tracking.find_run(client, experiment_id, f"study/{study}")
            if stage_run is not None and stage_run.info.status == "FINISHED":
                print(f"stage {stage}: completed before (study {study!r}), not run again")
                summary["stages"][stage] = {"study": study, "skipped": True, "study_run_id": stage_run.info.run_id}
            else:
                print(f"stage {stage}: study {study!r}" + (f", initialised from {init_runs}" if init_runs else ""))
                summary["stages"][stage] = run_study(
                    pipeline.stage_space(stage, init_runs), study_name=study, data_root=data_root,
                    storage_path=storage_path, promote=False, address=address, verbose=verbose,
                    parent_run_id=pipeline_run_id, tags={PIPELINE_TAG: name, STAGE_TAG: stage},
                )
            space = pipeline.stage_space(stage)
            best[stage] = best_trials(study, experiment=experiment, metric=space.study.metric,
                                      mode=space.study.mode, tracking_uri=tracking_uri)[0]
            client.log_metric(pipeline_run_id, f"{stage}.best_{space.study.metric}",
                              best[stage].data.metrics.get(f"best_{space.study.metric}",
                                                           best[stage].data.metrics.get(space.study.metric, float("nan"))))
        if pipeline.ensemble:
            summary["ensemble"] = ensemble_stages(pipeline, name, best, tracking_uri, experiment, pipeline_run_id)
        registered = best[pipeline.register_stage]
        summary.update(best_run_id=registered.info.run_id, best_trial_id=registered.data.tags.get(tracking.TRIAL_TAG),
                       best_stage=pipeline.register_stage, best_score=registered.data.metrics.get("best_val_top1"),
                       score_name="best_val_top1", lineage=lineage(registered))
        if promote:
            from mg_ray.registry import promote_run

            study_space = pipeline.stage_space(pipeline.register_stage)
            summary["promotion"] = promote_run(
                registered.info.run_id, study_space.study.register_as, tracking_uri=tracking_uri,
                metric=study_space.study.metric, mode=study_space.study.mode,
                lineage={"pipeline": name, "study": stage_study(name, pipeline.register_stage),
                         "trial": summary["best_trial_id"], **lineage(registered)},
            )
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, StudyInterrupted):
        status = "KILLED"
        raise
    finally:
        tracking.terminate_run(client, pipeline_run_id, status)


def lineage(run) -> dict[str, str]:
    """The run ids a fused trial's weights were initialised from (its `model.*_init` params)."""
    out = {}
    for stream in ("rgb", "pose"):
        location = run.data.params.get(f"model.{stream}_init", "")
        if location.startswith("runs:/"):
            out[f"init_{stream}_run"] = location[len("runs:/"):].split("/")[0]
    return out


def ensemble_stages(pipeline: Pipeline, name: str, best: dict[str, Any], tracking_uri: str, experiment: str,
                    pipeline_run_id: str) -> dict[str, Any]:
    """The score ensemble of the member stages' best runs, logged once as a run under the
    pipeline's (found again by its key when the pipeline runs again)."""
    from mg_ray.tune.ensemble import ensemble

    client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment)
    found = tracking.find_run(client, experiment_id, f"ensemble/{name}")
    if found is not None and found.info.status == "FINISHED":
        print(f"ensemble: logged before (MLflow run {found.info.run_id})")
        return {"run_id": found.info.run_id, "metrics": dict(found.data.metrics)}
    members = pipeline.ensemble.members
    out = ensemble([best[m].info.run_id for m in members], tracking_uri=tracking_uri, experiment=experiment,
                   name=f"{name}.ensemble", member_names=members, run_key=f"ensemble/{name}",
                   parent_run_id=pipeline_run_id, tags={PIPELINE_TAG: name})
    print("ensemble of " + ", ".join(members) + ": weights " + ", ".join(f"{w:.2f}" for w in out["weights"])
          + " | " + " | ".join(f"{k} {v:.3f}" for k, v in out["metrics"].items()))
    return out
