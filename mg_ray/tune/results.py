"""What a study's trials came to, read from their MLflow runs: the best trial, and the summary
logged on the study run.

"The best trial" is one rule (`ranked_trials`), used by the study's promotion, a pipeline's
stages, `mg-ray promote --study` and `mg-ray ensemble --study`: among the trials that completed
(only they have a logged best model and a test score), the best score (`tracking.run_score`: the
best epoch's `best_val_top1` for val_top1, else the metric as reported), ties to the trial Optuna
drew first (the smaller Optuna trial number, tag `mg_ray.optuna_trial`), then to the trial that
started first, then to the smaller run id.

Why Optuna's number: the study's Optuna storage names a best trial too (`Study.best_trial`, what
optuna-dashboard shows), and on a tie its RDB storage returns the tied trial with the smallest
number. Optuna does not document that order; `tests/tune/test_results.py` checks it on a real
sqlite storage, so an Optuna that changes it fails there, not in a user's dashboard. Start times
do not follow Optuna's numbers: Tune draws a trial's parameters when it creates the trial, and
starts its run when a slot frees.
"""

from __future__ import annotations

import csv
import html
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna

from mg_ray import tracking
from mg_ray.tracking import tags
from mg_ray.tracking.reports import RunLogger


class NoTrialsError(LookupError):
    """A study has no completed trial (or no trial at all) in the tracking store."""


def study_runs(mlflow_client, experiment_id: str, study: str) -> list:
    """Every trial run of `study` (orphaned ones excluded)."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` = 'trial'",
        max_results=5000,
    )
    return [r for r in runs if r.data.tags.get(tags.STATE) != "orphaned"]


def ranked_trials(runs: list, metric: str, mode: str) -> list:
    """The completed trial runs among `runs`, best first (the module's rule)."""
    done = [
        r
        for r in runs
        if r.data.tags.get(tags.STATE) == "completed" and tracking.run_score(r, metric) is not None
    ]
    sign = -1.0 if mode == "max" else 1.0

    def optuna_number(run) -> float:
        number = run.data.tags.get(tags.OPTUNA_TRIAL)
        return int(number) if number is not None else float("inf")  # no Optuna trial: after

    return sorted(
        done,
        key=lambda r: (
            sign * tracking.run_score(r, metric),
            optuna_number(r),
            r.info.start_time,
            r.info.run_id,
        ),
    )


def best_trials(
    study: str, *, experiment: str, metric: str, mode: str, tracking_uri: str, top: int = 1
) -> list:
    """The `top` best completed trial runs of `study`; NoTrialsError naming the study when none."""
    mlflow_client = tracking.client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = study_runs(mlflow_client, found.experiment_id, study) if found is not None else []
    ranked = ranked_trials(runs, metric, mode)
    if not ranked:
        what = f"{len(runs)} trial runs, none completed" if runs else "no trial runs"
        raise NoTrialsError(
            f"study {study!r}: {what} in MLflow experiment {experiment!r} at {tracking_uri}"
        )
    return ranked[:top]


def summarise(
    mlflow_client,
    parent_run_id: str,
    experiment_id: str,
    study: str,
    *,
    metric: str,
    mode: str,
    searched: list[str],
    optuna_storage: str,
    tracking_uri: str,
) -> dict[str, Any]:
    """Log the study's summary on its run (trials table, best trial's config and parameters,
    Optuna plots) and return it."""
    runs = study_runs(mlflow_client, experiment_id, study)
    rows = [
        {
            "trial_id": r.data.tags.get(tags.TRIAL),
            "mlflow_run_id": r.info.run_id,
            "state": r.data.tags.get(tags.STATE, "unknown"),
            "epochs": r.data.tags.get(tags.EPOCHS),
            metric: r.data.metrics.get(metric),
            tracking.score_name(metric): tracking.run_score(r, metric),
            "test_top1": r.data.metrics.get("test_top1"),
            "start_time": r.info.start_time,
            **{name: r.data.params.get(name) for name in searched},
        }
        for r in sorted(runs, key=lambda r: r.info.start_time)
    ]
    logger = RunLogger(tracking_uri, parent_run_id)
    logger.log_text(table_csv(rows), "study/trials.csv")
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    summary: dict[str, Any] = {"study": study, "num_trials": len(rows), "states": states}
    ranked = ranked_trials(runs, metric, mode)
    if ranked:
        best = ranked[0]
        score = tracking.run_score(best, metric)
        params = {name: best.data.params[name] for name in searched if name in best.data.params}
        log_best_config(mlflow_client, best.info.run_id, logger)
        mlflow_client.log_metric(parent_run_id, tracking.score_name(metric), score)
        for name, value in params.items():
            mlflow_client.set_tag(parent_run_id, f"best.{name}", value)
        mlflow_client.set_tag(parent_run_id, tags.BEST_RUN, best.info.run_id)
        summary.update(
            best_trial_id=best.data.tags[tags.TRIAL],
            best_run_id=best.info.run_id,
            best_score=score,
            score_name=tracking.score_name(metric),
            best_params=params,
        )
    mlflow_client.set_tag(
        parent_run_id,
        tags.DESCRIPTION,
        study_page(study, experiment_id, runs, ranked, metric, mode, searched),
    )
    log_optuna_plots(study, optuna_storage, logger)
    summary["view"] = study_view(
        mlflow_client, experiment_id, study, metric=metric, mode=mode, searched=searched
    )
    return summary


def study_view(
    mlflow_client, experiment_id: str, study: str, *, metric: str, mode: str, searched: list[str]
) -> str:
    """The MLflow runs table as a researcher compares a study: its trials, best first, with the
    objective, how each ended and the searched parameters as columns (a shared view of the
    experiment: `tracking.ui_link(..., view=<key>)` opens it); returns the view's key."""
    objective = tracking.column("metrics", tracking.score_name(metric))
    return tracking.share_runs_view(
        mlflow_client,
        experiment_id,
        search_filter=f"tags.`{tags.STUDY}` = '{study}' and tags.`{tags.ROLE}` = 'trial'",
        order_by=objective,
        ascending=mode == "min",
        columns=[
            objective,
            tracking.column("tags", tags.STATE),
            tracking.column("tags", tags.EPOCHS),
            *(tracking.column("params", name) for name in searched),
        ],
    )


def study_page(
    study: str,
    experiment_id: str,
    runs: list,
    ranked: list,
    metric: str,
    mode: str,
    searched: list[str],
) -> str:
    """The study run's description (markdown, shown on its page): the best trial as a link, then
    every trial ranked by the objective (the ranked completed ones first, then the others by
    their score), with its state, epochs and searched parameters."""
    objective = tracking.score_name(metric)
    order = {r.info.run_id: i for i, r in enumerate(ranked)}
    sign = -1.0 if mode == "max" else 1.0
    rest = sorted(  # stopped, failed or interrupted trials: those with a score first
        (r for r in runs if r.info.run_id not in order),
        key=lambda r: (
            tracking.run_score(r, metric) is None,
            sign * (tracking.run_score(r, metric) or 0.0),
        ),
    )
    shown = list(ranked) + rest

    def link(run) -> str:
        return f"[{run.info.run_name}](#/experiments/{experiment_id}/runs/{run.info.run_id})"

    def value(text: str | None) -> str:
        try:
            return f"{float(text):.4g}"
        except (TypeError, ValueError):
            return "" if text is None else str(text)

    lines = [f"## Study `{study}`", ""]
    if ranked:
        best = ranked[0]
        lines += [
            f"**Best trial:** {link(best)}: {objective} {tracking.run_score(best, metric):.4f}",
            "",
        ]
    else:
        lines += ["No trial completed.", ""]
    header = ["rank", "trial", "state", "epochs", objective, *searched]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, run in enumerate(shown, 1):
        cells = [
            str(i) if run.info.run_id in order else "",
            link(run),
            run.data.tags.get(tags.STATE, ""),
            run.data.tags.get(tags.EPOCHS, ""),
            value(tracking.run_score(run, metric)),
            *(value(run.data.params.get(name)) for name in searched),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Optuna's plots: artifact `study/optuna_plots.html`; the trials: `study/trials.csv`.",
    ]
    return "\n".join(lines)


def log_best_config(mlflow_client, run_id: str, logger) -> None:
    """The best trial's resolved config as the study's `study/best_config.yaml`. A run without
    one (a kill lost it before the run resumed) is named in a warning, not a failed study."""
    staged = {f.path for f in mlflow_client.list_artifacts(run_id, "config")}
    if "config/resolved_config.yaml" not in staged:
        print(
            f"warning: the best trial's run {run_id} has no config/resolved_config.yaml; "
            "the study's summary goes without study/best_config.yaml"
        )
        return
    with tempfile.TemporaryDirectory() as folder:
        config = mlflow_client.download_artifacts(run_id, "config/resolved_config.yaml", folder)
        logger.log_file(Path(config).rename(Path(folder) / "best_config.yaml"), "study")


def table_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def log_optuna_plots(study: str, optuna_storage: str, logger) -> None:
    """Optuna's interactive plots of the study (plotly), in one HTML file the MLflow UI renders
    (`study/optuna_plots.html`, plotly.js inside it: the UI may have no internet): optimisation
    history, parallel coordinates (log axes for log-scaled parameters) and parameter importances.
    A plot that cannot be drawn (the history needs a completed trial, the others 2) says why in
    its place."""
    # Imported here: heavy (plotly), and only the end of a study draws.
    from optuna import visualization

    loaded = optuna.load_study(study_name=study, storage=optuna_storage)
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {  # title: (plot, the completed trials it needs)
        "Optimisation history": (visualization.plot_optimization_history, 1),
        "Parallel coordinates": (visualization.plot_parallel_coordinate, 2),
        "Parameter importances": (visualization.plot_param_importances, 2),
    }
    parts, with_js = [], True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for title, (plot, needs) in plots.items():
            parts.append(f"<h2>{html.escape(title)}</h2>")
            try:
                if len(complete) < needs:  # (Optuna would warn, and draw an empty history)
                    raise ValueError(f"needs {needs} completed trial{'s' * (needs > 1)}")
                parts.append(plot(loaded).to_html(full_html=False, include_plotlyjs=with_js))
                with_js = False  # once per page
            except Exception as err:  # noqa: BLE001 (plots are a convenience: never fail the study on one)
                parts.append(f"<p>not plotted: {html.escape(str(err))}</p>")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(study)}</title>"
        f"</head><body><h1>Study {html.escape(study)}</h1>{''.join(parts)}</body></html>"
    )
    logger.log_text(page, "study/optuna_plots.html")
