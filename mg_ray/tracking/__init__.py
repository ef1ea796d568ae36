"""MLflow, for the whole project: the one package that talks to it.

    store.py    the tracking URI, a client, the experiment, UI links
    tags.py     the tag vocabulary of runs and registered versions
    runs.py     runs found by key, their lifecycle, source, dataset inputs, lineage, score rule
    reports.py  `RunLogger`: metrics, classification reports, plots
    models.py   a run's best model as a pyfunc and as its logged model; model URIs

Registering versions and the champion rule sit above prediction, in `mg_ray.registry`.
The names most callers need are here: `from mg_ray import tracking; tracking.client(uri)`.
"""

from mg_ray.tracking.runs import (
    DefinitionChanged,
    find_run,
    finished_run,
    git_commit,
    lineage,
    log_dataset,
    log_params,
    log_training_data,
    require_run,
    run_score,
    score_name,
    source_tags,
    start_or_resume_run,
    system_metrics,
    terminate_run,
)
from mg_ray.tracking.store import (
    check_store,
    check_tracking_server,
    client,
    column,
    get_or_create_experiment,
    resolve_tracking_uri,
    share_runs_view,
    ui_base,
    ui_link,
    use_store,
)

__all__ = [
    "DefinitionChanged",
    "check_store",
    "check_tracking_server",
    "client",
    "column",
    "find_run",
    "finished_run",
    "get_or_create_experiment",
    "git_commit",
    "lineage",
    "log_dataset",
    "log_params",
    "log_training_data",
    "require_run",
    "resolve_tracking_uri",
    "run_score",
    "score_name",
    "share_runs_view",
    "source_tags",
    "start_or_resume_run",
    "system_metrics",
    "terminate_run",
    "ui_base",
    "ui_link",
    "use_store",
]
