"""`python jobs/tune.py` / `mg-ray tune`: run or resume a hyperparameter study.

    python jobs/tune.py --space search_spaces/quick.yaml            # the embedded default
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --space search_spaces/quick.yaml

The study name defaults to the space file's stem; running the same command again resumes an
interrupted study (completed trials are not rerun). Use --study to start another one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mg_ray import paths, tracking
from mg_ray.data import load_index
from mg_ray.registry import existing_version_state
from mg_ray.tune.space import Pipeline, load_space

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", default="search_spaces/quick.yaml", help="search-space YAML")
    parser.add_argument("--study", help="study name (default: the space file's stem)")
    parser.add_argument("--trials", type=int, help="number of trials (default: the space's)")
    parser.add_argument("--data", help="dataset folder (default: the synthetic dataset)")
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)"
    )
    parser.add_argument("--storage-path", help=f"Ray storage (default: {paths.ray_storage()})")
    parser.add_argument("--no-promote", action="store_true", help="do not register the best model")


def example_clip(root: str) -> str:
    """A test clip's name in the dataset, for the printed `mg-ray predict` example."""
    index = load_index(root)
    split = index.split("test") if "test" in index.splits else next(iter(index.splits.values()))
    return split[0].frame_dir


def run(args: argparse.Namespace) -> int:
    # Imported here: the Tune stack (Ray Tune, Optuna) is heavy, and `--help` or a bad space file
    # answer without it.
    from mg_ray.tune.pipeline import run_pipeline
    from mg_ray.tune.study import StudyInterrupted, run_study

    space = load_space(args.space)  # validated before anything starts
    study = args.study or Path(args.space).stem
    if not STUDY_NAME.match(study):
        raise SystemExit(
            f"error: --study {study!r}: expected letters, digits, '_', '.', '-' (max 64)"
        )
    if args.trials is not None and args.trials < 1:
        raise SystemExit(f"error: --trials: expected an integer >= 1, got {args.trials}")
    if args.trials is not None and isinstance(space, Pipeline):
        raise SystemExit(
            "error: --trials: a pipeline's stages set their own trial counts (study.num_trials)"
        )
    try:
        if isinstance(space, Pipeline):
            summary = run_pipeline(
                space,
                name=study,
                data_root=args.data,
                storage_path=args.storage_path,
                promote=not args.no_promote,
                address=args.address,
            )
        else:
            summary = run_study(
                space,
                study_name=study,
                data_root=args.data,
                num_trials=args.trials,
                storage_path=args.storage_path,
                promote=not args.no_promote,
                address=args.address,
            )
    except StudyInterrupted as err:
        print(f"mg-ray tune: {err} (nothing was registered)", file=sys.stderr)
        return 128 + err.signum
    print()
    if isinstance(space, Pipeline):
        for stage, stage_summary in summary["stages"].items():
            print(
                f"stage {stage}: "
                + (
                    "completed before"
                    if stage_summary.get("skipped")
                    else f"{stage_summary['num_trials']} trials {stage_summary.get('states', {})}"
                )
            )
        if summary.get("ensemble"):
            print(
                "ensemble: "
                + " | ".join(
                    f"{k} {v:.3f}" for k, v in sorted(summary["ensemble"]["metrics"].items())
                )
            )
        print(
            f"best trial of stage {summary['best_stage']}: {summary['best_trial_id']} (MLflow run "
            f"{summary['best_run_id']}) {summary['score_name']} {summary['best_score']:.3f}"
            + (f", initialised from {summary['lineage']}" if summary["lineage"] else "")
        )
    else:
        print(f"study {study}: {summary['num_trials']} trials {summary.get('states', {})}")
        if "best_trial_id" in summary:
            params = ", ".join(f"{k}={v}" for k, v in summary["best_params"].items())
            print(
                f"best trial {summary['best_trial_id']} (MLflow run {summary['best_run_id']}): "
                f"{summary['score_name']} {summary['best_score']:.3f} with {params}"
            )
    print_promotion(summary)
    print_mlflow_ui(study, view=summary.get("view"))
    return 0


def print_promotion(summary: dict) -> None:
    promotion = summary.get("promotion")
    if not promotion:
        return
    role = "champion" if promotion["champion"] else "candidate"
    if promotion["new"]:
        print(
            f"registered model {promotion['name']} version {promotion['version']} (alias {role}; "
            f"{promotion['decision']})"
        )
    else:
        print(
            f"best model already registered as {promotion['name']} version {promotion['version']}: "
            f"{existing_version_state(promotion)}"
        )
    print(
        f"predict: mg-ray predict --model models:/{promotion['name']}@champion "
        f"--data {summary['data_root']} {example_clip(summary['data_root'])}"
    )


def print_mlflow_ui(study: str, experiment: str = "mg-ray", view: str | None = None) -> None:
    """How to look at the study in MLflow: the command for a sqlite store, and the link that opens
    the experiment's runs (the model-training view) on the study's trials, best first, with the
    objective and the searched parameters as columns (`view`, `results.study_view`)."""
    uri = tracking.resolve_tracking_uri(None)
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    base = tracking.ui_base(uri)
    if uri.startswith("sqlite:"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    if found is not None:
        print(
            f"  then open {tracking.ui_link(base, found.experiment_id, view=view)}  "
            f"(experiment {experiment!r}, study {study!r})"
        )
