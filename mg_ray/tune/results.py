"""What a study's trials came to, read from their MLflow runs: the best trial, and the summary
logged on the study run.

"The best trial" is one rule (`ranked_trials`), used by the study's promotion, `mg-ray promote
--study` and `mg-ray ensemble --study`: among the trials that completed (only they have a logged
best model and a test score), the best score (`best_val_top1` for val_top1, else the metric's last
value), ties to the trial that started first, then to the smaller run id.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray import tracking


class NoTrialsError(LookupError):
    """A study has no completed trial (or no trial at all) in the tracking store."""


def score_name(metric: str) -> str:
    """The run metric a study ranks its trials by: the loop reports a running best of val_top1."""
    return f"best_{metric}" if metric == "val_top1" else metric


def study_runs(mlflow_client, experiment_id: str, study: str) -> list:
    """Every trial run of `study` (orphaned ones excluded)."""
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.STUDY_TAG}` = '{study}' and tags.`{tracking.ROLE_TAG}` = 'trial'",
        max_results=5000,
    )
    return [r for r in runs if r.data.tags.get(tracking.STATE_TAG) != "orphaned"]


def ranked_trials(runs: list, metric: str, mode: str) -> list:
    """The completed trial runs among `runs`, best first (the module's rule)."""
    key = score_name(metric)
    done = [r for r in runs if r.data.tags.get(tracking.STATE_TAG) == "completed" and key in r.data.metrics]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(done, key=lambda r: (sign * r.data.metrics[key], r.info.start_time, r.info.run_id))


def best_trials(study: str, *, experiment: str, metric: str, mode: str, tracking_uri: str,
                top: int = 1) -> list:
    """The `top` best completed trial runs of `study`; NoTrialsError naming the study when none."""
    mlflow_client = tracking.client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    runs = study_runs(mlflow_client, found.experiment_id, study) if found is not None else []
    ranked = ranked_trials(runs, metric, mode)
    if not ranked:
        what = f"{len(runs)} trial runs, none completed" if runs else "no trial runs"
        raise NoTrialsError(f"study {study!r}: {what} in MLflow experiment {experiment!r} at {tracking_uri}")
    return ranked[:top]


def summarise(mlflow_client, parent_run_id: str, experiment_id: str, study: str, *, metric: str, mode: str,
              searched: list[str], optuna_storage: str, tracking_uri: str) -> dict[str, Any]:
    """Log the study's summary on its run (trials table, best trial's config and parameters,
    Optuna plots) and return it."""
    runs = study_runs(mlflow_client, experiment_id, study)
    rows = [{
        "trial_id": r.data.tags.get(tracking.TRIAL_TAG),
        "mlflow_run_id": r.info.run_id,
        "state": r.data.tags.get(tracking.STATE_TAG, "unknown"),
        "epochs": r.data.tags.get(tracking.EPOCHS_TAG),
        metric: r.data.metrics.get(metric),
        score_name(metric): r.data.metrics.get(score_name(metric)),
        "test_top1": r.data.metrics.get("test_top1"),
        "start_time": r.info.start_time,
        **{name: r.data.params.get(name) for name in searched},
    } for r in sorted(runs, key=lambda r: r.info.start_time)]
    logger = tracking.RunLogger(tracking_uri, parent_run_id)
    logger.log_text(table_csv(rows), "study/trials.csv")
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    summary: dict[str, Any] = {"study": study, "num_trials": len(rows), "states": states}
    ranked = ranked_trials(runs, metric, mode)
    if ranked:
        best = ranked[0]
        score = best.data.metrics[score_name(metric)]
        params = {name: best.data.params[name] for name in searched if name in best.data.params}
        with tempfile.TemporaryDirectory() as folder:
            config = mlflow_client.download_artifacts(best.info.run_id, "config/resolved_config.yaml", folder)
            logger.log_file(Path(config).rename(Path(folder) / "best_config.yaml"), "study")
        mlflow_client.log_metric(parent_run_id, score_name(metric), score)
        for name, value in params.items():
            mlflow_client.set_tag(parent_run_id, f"best.{name}", value)
        summary.update(best_trial_id=best.data.tags[tracking.TRIAL_TAG], best_run_id=best.info.run_id,
                       best_score=score, score_name=score_name(metric), best_params=params)
    log_optuna_plots(study, optuna_storage, logger)
    return summary


def table_csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def log_optuna_plots(study: str, optuna_storage: str, logger) -> None:
    """Optimisation history, parameter importances, parallel coordinates (matplotlib PNGs)."""
    plt = tracking.load_pyplot()  # before optuna's plotting module imports pyplot
    import optuna
    from optuna.visualization import matplotlib as ovm

    loaded = optuna.load_study(study_name=study, storage=optuna_storage)
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots.items():
            try:
                if name != "optimization_history" and len(complete) < 2:
                    raise ValueError("needs at least 2 completed trials")
                ax = plot(loaded)
                fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
                fig.set_size_inches(9, 5)
                fig.tight_layout()
                fig.savefig(Path(folder) / f"{name}.png", dpi=100)
                plt.close(fig)
            except Exception as err:  # noqa: BLE001 (plots are a convenience: never fail the study on one)
                (Path(folder) / f"{name}.txt").write_text(f"not plotted: {err}\n")
        logger.client.log_artifacts(logger.run_id, folder, "study/plots")
