"""The paper's recipe as one resumable study: single-stream stages, then the fused search initialised
from their best runs, then a score ensemble (the recipe: docs/recipe.md).

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

from pathlib import Path
from typing import Any

from mg_ray import tracking
from mg_ray.registry import promote_run
from mg_ray.tracking import tags
from mg_ray.tune.ensemble import ensemble
from mg_ray.tune.lock import driver_lock
from mg_ray.tune.results import best_trials, study_view
from mg_ray.tune.space import Pipeline, definition_fingerprint
from mg_ray.tune.study import check_storage, preflight, run_study, study_key
from mg_ray.tune.watch import StudyStopped


def stage_study(pipeline_name: str, stage: str) -> str:
    return f"{pipeline_name}.{stage}"


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
    each stage's summary under "stages". A second driver of the pipeline is refused first."""
    storage, _ = check_storage(storage_path, None)
    with driver_lock(storage, name, "pipeline"):
        return _run_pipeline(
            pipeline,
            name=name,
            data_root=data_root,
            storage_path=storage,
            promote=promote,
            address=address,
            verbose=verbose,
        )


def _run_pipeline(
    pipeline: Pipeline,
    *,
    name: str,
    data_root: str | None,
    storage_path: Path,
    promote: bool,
    address: str | None,
    verbose: int,
) -> dict[str, Any]:
    """`run_pipeline` once the pipeline's lock is held."""
    # Every stage's checks before Ray starts: a bad last stage fails now, not after the first.
    loaded: dict[tuple, Any] = {}  # the stages' dataset indexes: one per dataset
    checked = {
        stage: preflight(
            pipeline.stage_space(stage, {s: "0" * 32 for s in spec.init}),
            study_name=stage_study(name, stage),
            data_root=data_root,
            address=address,
            loaded=loaded,
        )
        for stage, spec in pipeline.stages.items()
    }
    first = next(iter(checked.values()))
    tracking_uri, experiment = first.tracking_uri, first.probe.tracking.experiment
    # Ray starts with the first stage that must run (`run_study`): a finished pipeline run again
    # only reports, and the ensemble and the promotion need no cluster.

    client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment)
    fingerprint = definition_fingerprint(pipeline)
    pipeline_run_id, _ = tracking.start_or_resume_run(  # a changed file is refused here
        client,
        experiment_id,
        f"pipeline/{name}",
        run_name=name,
        what=f"pipeline {name!r}",
        tags={
            tags.PIPELINE: name,
            tags.ROLE: "pipeline",
            tags.DEFINITION: fingerprint,
            tags.SPACE_FILE: pipeline.source,
            tags.STAGES: ",".join(pipeline.stages),
        },
        params={
            "pipeline.name": name,
            "pipeline.space": pipeline.source,
            "pipeline.stages": ",".join(pipeline.stages),
        },
    )
    summary: dict[str, Any] = {
        "pipeline": name,
        "stages": {},
        "pipeline_run_id": pipeline_run_id,
        "data_root": str(first.probe.data.root),
    }
    best: dict[str, Any] = {}  # stage -> its best completed trial run
    status = "FAILED"
    try:
        for stage, spec in pipeline.stages.items():
            study = stage_study(name, stage)
            init_runs = {stream: best[source].info.run_id for stream, source in spec.init.items()}
            stage_space = pipeline.stage_space(stage, init_runs)
            stage_run = tracking.finished_run(  # the rule `run_study` skips a study by
                client,
                experiment_id,
                study_key(study),
                definition_fingerprint(stage_space),
                f"study {study!r}",
            )
            if stage_run is not None:
                print(f"stage {stage}: completed before (study {study!r}), not run again")
                summary["stages"][stage] = {
                    "study": study,
                    "skipped": True,
                    "study_run_id": stage_run.info.run_id,
                }
            else:
                print(
                    f"stage {stage}: study {study!r}"
                    + (f", initialised from {init_runs}" if init_runs else "")
                )
                summary["stages"][stage] = run_study(
                    stage_space,
                    study_name=study,
                    storage_path=storage_path,
                    promote=False,
                    address=address,
                    verbose=verbose,
                    parent_run_id=pipeline_run_id,
                    tags={tags.PIPELINE: name, tags.STAGE: stage},
                    checked=checked[stage],
                )
            space = pipeline.stage_space(stage)
            best[stage] = best_trials(
                study,
                experiment=experiment,
                metric=space.study.metric,
                mode=space.study.mode,
                tracking_uri=tracking_uri,
            )[0]
            client.log_metric(
                pipeline_run_id,
                f"{stage}.{tracking.score_name(space.study.metric)}",
                tracking.run_score(best[stage], space.study.metric),
            )
        if pipeline.ensemble:
            summary["ensemble"] = ensemble_stages(
                pipeline, name, best, tracking_uri, experiment, pipeline_run_id
            )
        registered = best[pipeline.register_stage]
        register_space = pipeline.stage_space(pipeline.register_stage)
        study = register_space.study
        summary["view"] = study_view(  # the MLflow link opens the registered stage's trials
            client,
            registered.info.experiment_id,
            stage_study(name, pipeline.register_stage),
            metric=study.metric,
            mode=study.mode,
            searched=list(register_space.parameters),
        )
        summary.update(
            best_run_id=registered.info.run_id,
            best_trial_id=registered.data.tags.get(tags.TRIAL),
            best_stage=pipeline.register_stage,
            best_score=tracking.run_score(registered, study.metric),
            score_name=tracking.score_name(study.metric),
            lineage=tracking.lineage(
                registered.data.params.get("model.rgb_init"),
                registered.data.params.get("model.pose_init"),
            ),
        )
        if promote:
            summary["promotion"] = promote_run(
                registered.info.run_id,
                study.register_as,
                tracking_uri=tracking_uri,
                metric=study.metric,
                mode=study.mode,
                context={
                    "pipeline": name,
                    "study": stage_study(name, pipeline.register_stage),
                    "trial": summary["best_trial_id"],
                },
            )
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, StudyStopped):  # (StudyInterrupted too) the same command resumes it
        status = "KILLED"
        raise
    finally:
        tracking.terminate_run(client, pipeline_run_id, status)


def ensemble_stages(
    pipeline: Pipeline,
    name: str,
    best: dict[str, Any],
    tracking_uri: str,
    experiment: str,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """The score ensemble of the member stages' best runs, logged once as a run under the
    pipeline's (found again by its key when the pipeline runs again)."""

    client = tracking.client(tracking_uri)
    experiment_id = tracking.get_or_create_experiment(client, experiment)
    found = tracking.find_run(client, experiment_id, f"ensemble/{name}")
    if found is not None and found.info.status == "FINISHED":
        print(f"ensemble: logged before (MLflow run {found.info.run_id})")
        return {"run_id": found.info.run_id, "metrics": dict(found.data.metrics)}
    members = pipeline.ensemble.members
    out = ensemble(
        [best[m].info.run_id for m in members],
        tracking_uri=tracking_uri,
        experiment=experiment,
        name=f"{name}.ensemble",
        member_names=members,
        run_key=f"ensemble/{name}",
        parent_run_id=pipeline_run_id,
        tags={tags.PIPELINE: name},
    )
    print(
        "ensemble of "
        + ", ".join(members)
        + ": weights "
        + ", ".join(f"{w:.2f}" for w in out["weights"])
        + " | "
        + " | ".join(f"{k} {v:.3f}" for k, v in out["metrics"].items())
    )
    return out
