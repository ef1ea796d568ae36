"""One trial of a study: a Tune function trainable that runs one Ray Train run.

This is the pattern Ray documents for Tune over Train V2: the function builds a `TorchTrainer`
whose Train run is named after the trial (so a restored trial resumes its run from its last
checkpoint), reports through Ray's `TuneReportCallback`, and calls `fit()`. When Tune stops the
trial (ASHA, the time budget, the end of the study) it ends the trial's actor; the Train
controller and workers it owns end with it, and Ray Train's placement-group cleaner frees their
CPUs.

What mg-ray adds: the trial's config is built here, once, from the study's base config and the
trial's parameters, and passed on to the workers as the dataclass; the trial's MLflow run, which
the study driver opened (`mg_ray.tune.trial_state`), is found here, once, and its id handed to
the Train controller, which logs every epoch into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mg_ray import ray_env, tracking
from mg_ray.config import apply_overrides, flatten, from_mapping, to_dict
from mg_ray.train.config import ExperimentConfig
from mg_ray.train.loop import SharedIndex
from mg_ray.train.trainer import fit
from mg_ray.tune.space import SearchSpace, trial_overrides


@dataclass
class StudyContext:
    """What every trial needs to know about its study (passed with `tune.with_parameters`)."""

    name: str
    base: dict[str, Any]  # base training config as a nested dict
    space: SearchSpace
    tracking_uri: str
    experiment: str
    parent_run_id: str
    train_storage: str  # where the trials' Train runs (and checkpoints) live
    optuna_storage: str  # Optuna RDB storage URL holding the study of the same name
    max_epochs: int  # a trial that reported this many epochs completed
    dataset_fingerprint: str | None = None  # the shared index's dataset's, computed once


def trial_config(ctx: StudyContext, params: dict[str, Any]) -> ExperimentConfig:
    """The full training config of one trial: base + fixed + sampled parameters."""
    sampled = {k: v for k, v in params.items() if "|" not in k}  # drop conditional helper names
    data = apply_overrides(ctx.base, trial_overrides(ctx.space, sampled))
    data = apply_overrides(
        data, {"tracking.tracking_uri": ctx.tracking_uri, "tracking.experiment": ctx.experiment}
    )
    return from_mapping(ExperimentConfig, data)


def train_run_name(ctx: StudyContext, trial_id: str) -> str:
    """The name of a trial's Train run (its folder under `ctx.train_storage`)."""
    return f"{ctx.name}_{trial_id}"


def run_key(ctx: StudyContext, trial_id: str) -> str:
    """The key of a trial's MLflow run."""
    return f"{ctx.name}/{trial_id}"


def run_trial(params: dict[str, Any], ctx: StudyContext, index: SharedIndex | None = None) -> None:
    """The Tune function trainable: one Ray Train run with this trial's configuration. `index`:
    the dataset's index the driver loaded (passed with `tune.with_parameters` beside `ctx`,
    which Tune also keeps in its experiment state, where an object reference does not belong);
    handed on to the workers when the trial reads that dataset."""
    ray_env.apply_defaults(ray_env.TRIAL)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, params)
    client = tracking.client(ctx.tracking_uri)
    run = tracking.require_run(client, ctx.experiment, run_key(ctx, trial_id))
    same_data = index is not None and index.serves(cfg.data)
    describe_run(client, run, cfg, ctx.dataset_fingerprint if same_data else None)
    with tracking.system_metrics(
        ctx.tracking_uri,
        run.info.run_id,
        enabled=cfg.tracking.system_metrics,
        interval_s=cfg.tracking.system_metrics_interval_s,
    ):
        fit(
            cfg,
            name=train_run_name(ctx, trial_id),
            storage_path=ctx.train_storage,
            tracking_uri=ctx.tracking_uri,
            run_id=run.info.run_id,
            callbacks=[TuneReportCallback()],
            index=index,  # a worker whose data it does not serve loads its own
        )


def describe_run(client, run, cfg: ExperimentConfig, fingerprint: str | None = None) -> None:
    """What a trial's run says of its training: the whole config as parameters, the dataset as
    inputs, and the runs its streams were initialised from (lineage). Each part is written on
    the trial's first start, and again on a restart that finds it missing (a start that failed
    half-way); a resumed trial's run keeps what it has. `fingerprint`: the dataset's, when the
    driver computed it (else it is computed here)."""
    run_id = run.info.run_id
    if not run.data.params:
        tracking.log_params(client, run_id, flatten(to_dict(cfg)))
    if not run.inputs.dataset_inputs:
        tracking.log_training_data(client, run_id, cfg.data, fingerprint)
    for key, value in tracking.lineage(cfg.model.rgb_init, cfg.model.pose_init).items():
        client.set_tag(run_id, key, value)
