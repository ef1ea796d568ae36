"""The best-trial rule (`results.ranked_trials`, `results.best_trials`) on a real sqlite MLflow
store: among a study's completed trials, the best score (`best_val_top1` for val_top1, the metric
itself otherwise), ties to the trial Optuna drew first, then to the trial that started first, then
to the smaller run id; trials that were stopped, failed, orphaned or have no score never win, and
other studies are not looked at."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mg_ray import tracking
from mg_ray.tracking import tags
from mg_ray.tune.results import (
    NoTrialsError,
    best_trials,
    ranked_trials,
    study_page,
    study_runs,
)

EXPERIMENT = "results-test"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment_id = client.create_experiment(EXPERIMENT)

    def trial(
        study: str,
        state: str,
        start: int,
        run_id_hint: str = "",
        optuna: int | None = None,
        **metrics,
    ) -> str:
        drawn = {tags.OPTUNA_TRIAL: str(optuna)} if optuna is not None else {}
        run = client.create_run(
            experiment_id,
            start_time=start,
            run_name=f"{study}-{run_id_hint or start}",
            tags={
                tags.STUDY: study,
                tags.ROLE: "trial",
                tags.STATE: state,
                tags.TRIAL: f"t{start}",
                **drawn,
            },
        )
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    return SimpleNamespace(uri=uri, client=client, experiment_id=experiment_id, trial=trial)


def names(runs) -> list[str]:
    return [r.info.run_name for r in runs]


def test_best_completed_trial_by_its_best_epoch(store):
    uri, client, experiment_id, trial = store.uri, store.client, store.experiment_id, store.trial
    trial("s", "completed", 1, best_val_top1=0.70, val_top1=0.95)  # last epoch high, best low
    trial("s", "completed", 2, best_val_top1=0.80, val_top1=0.60)
    trial("s", "stopped", 3, best_val_top1=0.99)  # ASHA stopped it: no logged best model
    trial("s", "failed", 4, best_val_top1=0.99)
    trial("s", "orphaned", 5, best_val_top1=0.99)
    trial("s", "completed", 6)  # completed without a score
    trial("other", "completed", 7, best_val_top1=1.0)

    runs = study_runs(client, experiment_id, "s")
    assert sorted(names(runs)) == ["s-1", "s-2", "s-3", "s-4", "s-6"]  # orphaned left out
    assert names(ranked_trials(runs, "val_top1", "max")) == ["s-2", "s-1"]

    best = best_trials("s", experiment=EXPERIMENT, metric="val_top1", mode="max", tracking_uri=uri)
    assert names(best) == ["s-2"]
    assert tracking.run_score(best[0], "val_top1") == 0.80
    top = best_trials(
        "s", experiment=EXPERIMENT, metric="val_top1", mode="max", tracking_uri=uri, top=5
    )
    assert names(top) == ["s-2", "s-1"]


def test_ties_go_to_the_earlier_trial_then_the_smaller_run_id(store):
    client, experiment_id, trial = store.client, store.experiment_id, store.trial
    late = trial("s", "completed", 20, best_val_top1=0.5)
    first = trial("s", "completed", 10, best_val_top1=0.5)
    same_a = trial("s", "completed", 30, "a", best_val_top1=0.6)
    same_b = trial("s", "completed", 30, "b", best_val_top1=0.6)
    ranked = ranked_trials(study_runs(client, experiment_id, "s"), "val_top1", "max")
    assert [r.info.run_id for r in ranked] == [*sorted([same_a, same_b]), first, late]


def test_ties_go_first_to_the_trial_optuna_drew_first(store):
    """Tune draws a trial's parameters when it creates it and starts its run when a slot frees:
    Optuna's trial 0 can start after trial 1. A tie goes to the smaller Optuna number, as
    Optuna's own best trial does (next test); a run without one (an older mg-ray's) comes after."""
    client, experiment_id, trial = store.client, store.experiment_id, store.trial
    second = trial("s", "completed", 10, optuna=1, best_val_top1=0.5)
    first = trial("s", "completed", 20, optuna=0, best_val_top1=0.5)
    older = trial("s", "completed", 5, best_val_top1=0.5)
    ten = trial("s", "completed", 30, optuna=10, best_val_top1=0.5)  # 10 after 1: a number
    ranked = ranked_trials(study_runs(client, experiment_id, "s"), "val_top1", "max")
    assert [r.info.run_id for r in ranked] == [first, second, ten, older]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_optunas_best_trial_on_a_tie_is_the_smallest_number(tmp_path, direction):
    """The anchor of the rule above (Optuna does not document its tie order): on a real sqlite
    storage, with the tied trials told in shuffled orders, `Study.best_trial` (which
    optuna-dashboard shows) is the tied trial with the smallest number."""
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(0)
    for attempt in range(6):
        study = optuna.create_study(
            storage=f"sqlite:///{tmp_path / f'{direction}-{attempt}.db'}", direction=direction
        )
        values = [rng.choice([0.1, 0.5]) for _ in range(8)]
        drawn = [study.ask() for _ in values]
        told = list(range(len(values)))
        rng.shuffle(told)
        for number in told:
            study.tell(drawn[number], values[number])
        best = max(values) if direction == "maximize" else min(values)
        tied = [n for n, v in enumerate(values) if v == best]
        assert study.best_trial.number == tied[0], (values, told)


def test_a_minimised_metric_is_scored_as_reported(store):
    client, experiment_id, trial = store.client, store.experiment_id, store.trial
    trial("s", "completed", 1, val_loss=0.3, best_val_loss=0.1)
    trial("s", "completed", 2, val_loss=0.2)
    ranked = ranked_trials(study_runs(client, experiment_id, "s"), "val_loss", "min")
    assert names(ranked) == ["s-2", "s-1"]


def test_no_completed_trial_is_an_error_naming_the_study(store):
    uri, trial = store.uri, store.trial
    trial("s", "stopped", 1, best_val_top1=0.5)
    trial("s", "failed", 2)
    with pytest.raises(NoTrialsError, match="study 's': 2 trial runs, none completed"):
        best_trials("s", experiment=EXPERIMENT, metric="val_top1", mode="max", tracking_uri=uri)
    with pytest.raises(NoTrialsError, match="study 'nope': no trial runs"):
        best_trials("nope", experiment=EXPERIMENT, metric="val_top1", mode="max", tracking_uri=uri)
    with pytest.raises(NoTrialsError, match="experiment 'missing'"):
        best_trials("s", experiment="missing", metric="val_top1", mode="max", tracking_uri=uri)


def test_the_study_page_links_the_best_trial_and_ranks_every_trial(store):
    client, experiment_id, trial = store.client, store.experiment_id, store.trial
    low = trial("s", "completed", 1, best_val_top1=0.7)
    best = trial("s", "completed", 2, best_val_top1=0.8123456)
    trial("s", "stopped", 3, best_val_top1=0.75)  # scored, but not registrable: after them
    trial("s", "failed", 4)
    runs = study_runs(client, experiment_id, "s")
    ranked = ranked_trials(runs, "val_top1", "max")
    page = study_page("s", experiment_id, runs, ranked, "val_top1", "max", [])
    link = f"[s-2](#/experiments/{experiment_id}/runs/{best})"
    assert f"**Best trial:** {link}: best_val_top1 0.8123" in page, page
    rows = [line for line in page.splitlines() if line.startswith("| ") and "[s-" in line]
    assert [r.split(" | ")[1].split("]")[0] for r in rows] == ["[s-2", "[s-1", "[s-3", "[s-4"]
    assert rows[0].startswith("| 1 |") and rows[2].startswith("|  |")  # stopped: no rank
    assert f"runs/{low})" in rows[1] and "| 0.8123 |" in rows[0]


@pytest.mark.parametrize("completed", [0, 2])
def test_optuna_plots_need_completed_trials_and_say_so(tmp_path, caplog, completed):
    """The study's plot page (a real MLflow run's artifact): with no completed trial (all of them
    pruned, say) no plot is drawn and each says why, without Optuna's warning of an empty
    history; with 2, all three are drawn."""
    import optuna
    from optuna.trial import TrialState

    from mg_ray.tracking.reports import RunLogger
    from mg_ray.tune.results import log_optuna_plots

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    lr = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)}
    for k in range(3):
        trial = study.ask(lr)
        trial.report(0.1 * k, step=1)
        if k < completed:
            study.tell(trial, 0.1 * k)
        else:
            study.tell(trial, state=TrialState.PRUNED)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = client.create_run(client.create_experiment("plots")).info.run_id

    with caplog.at_level("WARNING", logger="optuna"):
        log_optuna_plots("s", storage, RunLogger(uri, run_id))

    (tmp_path / "page").mkdir()
    page = client.download_artifacts(run_id, "study/optuna_plots.html", str(tmp_path / "page"))
    text = Path(page).read_text()
    assert "no complete trials" not in caplog.text.lower()
    if completed:
        assert "not plotted" not in text and text.count("plotly-graph-div") >= 3
    else:
        assert text.count("not plotted: needs") == 3 and "needs 1 completed trial<" in text
