"""`mg-ray promote` / `python jobs/promote.py`: register a run's best model by hand.

    mg-ray promote --run <run id> [--name mg-ray-fused]
    mg-ray promote --study quick        # the study's best trial (`mg_ray.tune.results`)

A new version gets the alias `candidate`, and `champion` only when it beats the current champion
(or with --force-champion); a run that already has a version is not registered again
(`mg_ray.registry`).
"""

from __future__ import annotations

import argparse

from mg_ray import tracking
from mg_ray.registry import CHAMPION, existing_version_state, promote_run
from mg_ray.tune.results import best_trials


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="MLflow run id of a training run (or trial)")
    which.add_argument("--study", help="promote the best trial of this study instead")
    parser.add_argument("--experiment", default="mg-ray", help="the study's MLflow experiment")
    parser.add_argument("--name", default="mg-ray-fused", help="registered model name")
    parser.add_argument("--metric", default="val_top1")
    parser.add_argument("--mode", choices=["max", "min"], default="max")
    parser.add_argument(
        "--force-champion",
        action="store_true",
        help="make this version champion even if it does not beat the current one",
    )
    parser.add_argument(
        "--tracking-uri", help="default: MLFLOW_TRACKING_URI or the local sqlite store"
    )


def run(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store(uri)
    if args.study:
        [best] = best_trials(
            args.study,
            experiment=args.experiment,
            metric=args.metric,
            mode=args.mode,
            tracking_uri=uri,
        )
        args.run = best.info.run_id
    out = promote_run(
        args.run,
        args.name,
        tracking_uri=uri,
        metric=args.metric,
        mode=args.mode,
        force_champion=args.force_champion,
    )
    if out["new"]:
        state = (
            "champion"
            if out["champion"]
            else f"candidate (champion stays version {out['previous_champion']})"
        )
        print(
            f"registered {out['name']} version {out['version']} ({args.metric} {out['score']:.4f}): {state}"
        )
    else:
        print(
            f"run {args.run} is already registered as {out['name']} version {out['version']} "
            f"({args.metric} {out['score']:.4f}): {existing_version_state(out)}"
        )
    print(
        f"predict with: mg-ray predict --model models:/{out['name']}@{CHAMPION} CLIP.mp4 --skeleton CLIP.npz"
    )
    return 0
