"""What a study's driver writes after `fit()` about trials Tune told it nothing of, on a real
sqlite MLflow store and a real Optuna storage (no Ray: Tune's part is the trials' configs and
epochs, which `TrialRuns.on_experiment_end` and the driver hand over): the runs of trials the
time budget ended while they waited to start (`close_not_started`), and the epochs an
interruption caught between MLflow and Optuna (`backfill_optuna_trials`).

The e2e test of the same ending, with Tune, is
`tests/e2e/test_study_endings.py::test_a_time_budget_that_ends_before_the_trial_starts_...`;
the case of a trial a resume restored is only here: Tune restarts the budget's clock on resume,
and no study can be made to hit it on purpose in a test's time."""

from __future__ import annotations

import optuna
import pytest

from mg_ray import tracking
from mg_ray.tracking import tags
from mg_ray.tune.scheduling import TUNE_TRIAL_ID, backfill_optuna_trials
from mg_ray.tune.space import base_config_dict, load_space
from mg_ray.tune.trial import StudyContext
from mg_ray.tune.trial_state import (
    Session,
    close_not_started,
    close_unfinished,
    open_run,
    settle_optuna_trials,
)

SPACE = """\
base: small
study: {num_trials: 3, metric: val_top1, mode: max, time_budget_s: 60}
parameters:
  optim.lr: {type: categorical, choices: [0.01, 0.02]}
"""


def study_context(tmp_path) -> StudyContext:
    """A study "s" of SPACE, with its parent run, on sqlite MLflow and Optuna stores."""
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    client = tracking.client(uri)
    experiment_id = tracking.get_or_create_experiment(client, "mg-ray")
    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_space(tmp_path / "space.yaml")
    return StudyContext(
        name="s",
        base=base_config_dict(space),
        space=space,
        tracking_uri=uri,
        experiment="mg-ray",
        parent_run_id=client.create_run(experiment_id, run_name="s").info.run_id,
        train_storage=str(tmp_path / "s_train"),
        optuna_storage=storage,
        max_epochs=4,
    )


def test_trials_the_budget_ended_while_they_waited_to_start_end_stopped_everywhere(tmp_path):
    ctx = study_context(tmp_path)
    uri, storage, parent = ctx.tracking_uri, ctx.optuna_storage, ctx.parent_run_id
    client = tracking.client(uri)
    experiment_id = client.get_experiment_by_name("mg-ray").experiment_id
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for tune_id in ("done", "restored", "new"):  # what StudySearch draws: RUNNING, tagged
        study.ask().set_user_attr(TUNE_TRIAL_ID, tune_id)
    study.tell(0, 0.5)
    session = Session(ctx)
    # "done" completed; "restored" was interrupted after 2 epochs and the study resumed
    for tune_id, state, status in (
        ("done", "completed", "FINISHED"),
        ("restored", "interrupted", "KILLED"),
    ):
        run_id = open_run(ctx, tune_id)
        client.set_tag(run_id, tags.STATE, state)
        client.set_tag(run_id, tags.EPOCHS, "2")
        tracking.terminate_run(client, run_id, status)
    # then the budget ran out with "restored" not yet restarted and "new" not yet started
    session.configs = {t: {"optim.lr": 0.02} for t in ("done", "restored", "new")}

    left = close_not_started(session, {"done": 4, "restored": 2})
    settle_optuna_trials(session, left)

    assert sorted(left) == ["new", "restored"] and not session.open
    children = {
        r.data.tags[tags.TRIAL]: r
        for r in client.search_runs([experiment_id], f"tags.`{tags.PARENT}` = '{parent}'")
    }
    assert children["done"].data.tags[tags.STATE] == "completed"  # untouched
    for tune_id, epochs in (("restored", "2"), ("new", "0")):
        run = children[tune_id]
        assert (run.info.status, run.data.tags[tags.STATE], run.data.tags[tags.EPOCHS]) == (
            "FINISHED",
            "stopped",
            epochs,
        )
        assert run.data.tags[tags.STOP_REASON] == "time_budget"
    assert float(children["new"].data.params["optim.lr"]) == 0.02  # its config, as a run's
    trials = {
        t.user_attrs[TUNE_TRIAL_ID]: t
        for t in optuna.load_study(study_name="s", storage=storage).trials
    }
    assert {k: t.state.name for k, t in trials.items()} == {
        "done": "COMPLETE",
        "restored": "PRUNED",
        "new": "PRUNED",
    }
    assert trials["new"].user_attrs["mlflow_run_id"] == children["new"].info.run_id


def test_an_interrupted_trials_optuna_trial_gets_every_epoch_its_run_holds(tmp_path):
    """At an interruption the Train controller may have logged an epoch into MLflow that Tune's
    report has not brought to Optuna yet: `backfill_optuna_trials` adds it (and only to trials
    still RUNNING, the ones the resume goes on with)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for tune_id in ("open", "over"):
        trial = study.ask()
        trial.set_user_attr(TUNE_TRIAL_ID, tune_id)
        trial.report(0.25, step=1)
    study.tell(1, 0.25)

    backfill_optuna_trials(storage, "s", {"open": [(1, 0.25), (2, 0.5)], "over": [(2, 0.75)]})

    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.intermediate_values for t in trials] == [{1: 0.25, 2: 0.5}, {1: 0.25}]


@pytest.mark.parametrize("interrupted", [False, True], ids=["time_budget", "interrupted"])
def test_an_epoch_that_reached_mlflow_and_not_tune_counts_in_every_store(tmp_path, interrupted):
    """The Train controller logs an epoch into MLflow as soon as its checkpoint is recorded, so a
    study that ends early can find a trial's run one epoch ahead of Tune: the run's
    `mg_ray.trial_epochs` and its Optuna trial count that epoch too. Cut by the time budget, the
    Optuna trial is PRUNED with that epoch's score, the run's; interrupted, it stays RUNNING with
    every epoch, for the resume to go on from."""
    ctx = study_context(tmp_path)
    client = tracking.client(ctx.tracking_uri)
    study = optuna.create_study(study_name="s", storage=ctx.optuna_storage, direction="maximize")
    trial = study.ask()
    trial.set_user_attr(TUNE_TRIAL_ID, "cut")
    scores = [0.25, 0.5, 0.75]  # the running best after epochs 1, 2, 3
    for epoch, score in enumerate(scores[:2], start=1):  # Tune's reports brought 2 to Optuna
        trial.report(score, step=epoch)
    session = Session(ctx, interrupted=interrupted)
    run_id = session.open["cut"] = open_run(ctx, "cut")
    for step, score in enumerate(scores):  # the controller logged 3
        client.log_metric(run_id, tracking.score_name("val_top1"), score, step=step)

    ended = close_unfinished(session, {"cut": 2}, wait=False)
    settle_optuna_trials(session, ended)

    run = client.get_run(run_id)
    assert ended == ["cut"] and run.data.tags[tags.EPOCHS] == "3"
    assert tracking.run_score(run, "val_top1") == 0.75
    [stored] = optuna.load_study(study_name="s", storage=ctx.optuna_storage).trials
    assert stored.intermediate_values == {1: 0.25, 2: 0.5, 3: 0.75}
    if interrupted:
        assert (run.data.tags[tags.STATE], stored.state.name) == ("interrupted", "RUNNING")
    else:
        assert (run.data.tags[tags.STATE], stored.state.name) == ("stopped", "PRUNED")
        assert stored.value == 0.75  # the run's score, not the epoch-2 one Tune saw
