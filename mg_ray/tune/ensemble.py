"""`mg-ray ensemble`: score-level ensemble of several runs (the paper's final step).

    mg-ray ensemble --runs <run id> <run id> ... [--study quick]

Each run's saved validation and test predictions (`evaluation/{val,test}_predictions.npz`) are
combined as a weighted sum of class probabilities; the weights are searched on validation
(coordinate ascent over a grid on the simplex), then applied to test. The result is logged as a
new MLflow run with the weights, the metrics and the ensembled predictions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import mlflow.artifacts
import numpy as np

from mg_ray import tracking
from mg_ray.metrics import topk_accuracy
from mg_ray.predict import (
    check_submission_target,
    classify,
    dataset_clips,
    load_classifier,
    write_submission,
)
from mg_ray.tracking.models import log_best_model
from mg_ray.tracking.reports import RunLogger
from mg_ray.tracking.tags import MEMBER_NAMES, MEMBERS, ROLE
from mg_ray.tune.results import best_trials


def load_predictions(
    run_id: str, split: str, tracking_uri: str, folder: Path
) -> dict[str, np.ndarray]:
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{run_id}/evaluation/{split}_predictions.npz",
            dst_path=str(folder / run_id),
            tracking_uri=tracking_uri,
        )
    except Exception as err:  # noqa: BLE001 (whatever the artifact store raises)
        raise FileNotFoundError(
            f"run {run_id}: no evaluation/{split}_predictions.npz ({err})"
        ) from None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def search_weights(
    probs: list[np.ndarray], labels: np.ndarray, steps: int = 10, rounds: int = 3
) -> np.ndarray:
    """Weights (summing to 1) maximising validation top-1 of sum_i w_i * probs_i.

    Small ensembles (<= 3 members) are searched exhaustively on a grid of 1/steps; larger ones by
    coordinate ascent from equal weights. Ties keep the earlier (more uniform) weights.
    """
    n = len(probs)
    stack = np.stack(probs)  # [M, N, K]

    def score(w: np.ndarray) -> float:
        return topk_accuracy(np.tensordot(w, stack, axes=1), labels, 1)

    if n <= 3:
        grid = [
            np.array(c) / steps
            for c in itertools.product(range(steps + 1), repeat=n)
            if sum(c) == steps
        ]
        grid.sort(key=lambda w: np.abs(w - 1 / n).sum())  # prefer uniform weights on ties
        return max(grid, key=score)
    weights = np.full(n, 1.0 / n)
    for _ in range(rounds):
        for i in range(n):
            best_w, best_s = weights, score(weights)
            for value in np.linspace(0, 1, steps + 1):
                trial = weights.copy()
                trial[i] = value
                if trial.sum() == 0:
                    continue
                trial /= trial.sum()
                s = score(trial)
                if s > best_s:
                    best_w, best_s = trial, s
            weights = best_w
    return weights


def ensemble(
    run_ids: list[str],
    *,
    tracking_uri: str | None = None,
    experiment: str = "mg-ray",
    name: str | None = None,
    member_names: list[str] | None = None,
    run_key: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Search the weights on validation, apply them to test, and log the ensemble as a run (with
    each member's val and test top-1 beside the ensemble's). `member_names` name the members in
    the metrics (default: member_0, member_1, ...); `run_key`, `parent_run_id`, `tags` place the
    run (a pipeline's ensemble step)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    names = member_names or [f"member_{i}" for i in range(len(run_ids))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        val = [load_predictions(r, "val", uri, folder) for r in run_ids]
        for r, v in zip(run_ids, val):
            if not np.array_equal(v["clip_names"], val[0]["clip_names"]):
                raise ValueError(
                    f"run {r}: its validation clips differ from run {run_ids[0]}'s; "
                    f"an ensemble needs predictions on the same split"
                )
        labels = val[0]["labels"]
        weights = search_weights([v["fused"] for v in val], labels)
        metrics = {
            f"val_top1_{n}": topk_accuracy(v["fused"], labels, 1) for n, v in zip(names, val)
        }
        fused_val = np.tensordot(weights, np.stack([v["fused"] for v in val]), axes=1)
        metrics.update(
            val_top1=topk_accuracy(fused_val, labels, 1),
            val_top5=topk_accuracy(fused_val, labels, 5),
        )
        test = None
        try:
            test = [load_predictions(r, "test", uri, folder) for r in run_ids]
        except FileNotFoundError:
            pass
        if test:
            fused_test = np.tensordot(weights, np.stack([t["fused"] for t in test]), axes=1)
            metrics.update(
                test_top1=topk_accuracy(fused_test, test[0]["labels"], 1),
                test_top5=topk_accuracy(fused_test, test[0]["labels"], 5),
            )
            metrics.update(
                {
                    f"test_top1_{n}": topk_accuracy(t["fused"], t["labels"], 1)
                    for n, t in zip(names, test)
                }
            )
        mlflow_client = tracking.client(uri)
        experiment_id = tracking.get_or_create_experiment(mlflow_client, experiment)
        run_id, _ = tracking.start_or_resume_run(
            mlflow_client,
            experiment_id,
            run_key or f"ensemble/{'+'.join(run_ids)}",
            run_name=name or f"ensemble-{len(run_ids)}",
            parent_run_id=parent_run_id,
            tags={
                ROLE: "ensemble",
                MEMBERS: ",".join(run_ids),
                MEMBER_NAMES: ",".join(names),
                **(tags or {}),
            },
        )
        tracking.log_params(
            mlflow_client, run_id, {f"weight.{n}": f"{w:.4f}" for n, w in zip(names, weights)}
        )
        logger = RunLogger(uri, run_id)
        logger.log_metrics(metrics, step=0)
        logger.log_text(
            json.dumps({"members": run_ids, "names": names, "weights": weights.tolist()}, indent=2),
            "ensemble.json",
        )
        np.savez_compressed(
            folder / "val_predictions.npz",
            labels=labels,
            fused=fused_val,
            clip_names=val[0]["clip_names"],
        )
        logger.log_file(folder / "val_predictions.npz", "evaluation")
        if test:
            np.savez_compressed(
                folder / "test_predictions.npz",
                labels=test[0]["labels"],
                fused=fused_test,
                clip_names=test[0]["clip_names"],
            )
            logger.log_file(folder / "test_predictions.npz", "evaluation")
        tracking.terminate_run(mlflow_client, run_id, "FINISHED")
    return {"run_id": run_id, "weights": weights.tolist(), "metrics": metrics}


def ensemble_submission(
    run_ids: list[str], weights: list[float], data: Path, split: str, out: Path, tracking_uri: str
) -> Path:
    """The MiGA submission of the weighted ensemble for every clip of `split` of dataset `data`
    (labeled or not): each member's logged model classifies the clips, the fused probabilities
    are weighted as the ensemble's, and `mg_ray.predict.write_submission` writes `out` (and its
    top-5 CSV). Returns `out`."""
    client = tracking.client(tracking_uri)
    clips = dataset_clips(Path(data), [], split)
    total, class_names = None, None
    for run_id, weight in zip(run_ids, weights):
        model, inner = load_classifier(
            f"models:/{log_best_model(client, run_id, tracking_uri)}", tracking_uri
        )
        if class_names is not None and list(inner.class_names) != list(class_names):
            raise ValueError(f"run {run_id}: its classes differ from the first member's")
        class_names = inner.class_names
        probs = weight * classify(model, inner, [(c, s) for c, s, _ in clips])
        total = probs if total is None else total + probs
    write_submission(Path(out), [Path(c).stem for c, _, _ in clips], total, class_names)
    return Path(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", help="MLflow run ids to ensemble")
    parser.add_argument(
        "--study", help="ensemble the best --top completed trials of this study instead"
    )
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--experiment", default="mg-ray")
    parser.add_argument("--name", help="run name of the ensemble run")
    parser.add_argument("--tracking-uri")
    parser.add_argument(
        "--submission",
        type=Path,
        help="also write the ensemble's MiGA submission zip for --data DIR --split NAME (must not exist)",
    )
    parser.add_argument("--data", type=Path, help="with --submission: the dataset folder")
    parser.add_argument(
        "--split", default="test", help="with --submission: the split to predict (default test)"
    )


def run(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_store(uri)
    if bool(args.runs) == bool(args.study):
        raise SystemExit("error: give either --runs RUN [RUN ...] or --study NAME")
    run_ids = args.runs or [
        r.info.run_id
        for r in best_trials(
            args.study,
            experiment=args.experiment,
            metric="val_top1",
            mode="max",
            tracking_uri=uri,
            top=args.top,
        )
    ]
    if len(run_ids) < 2:
        raise SystemExit(f"error: an ensemble needs at least 2 runs, got {len(run_ids)}")
    if args.submission is not None:
        if args.data is None:
            raise SystemExit("error: --submission needs --data DIR (and --split, default test)")
        check_submission_target(args.submission)
    out = ensemble(run_ids, tracking_uri=uri, experiment=args.experiment, name=args.name)
    print(
        f"ensemble run {out['run_id']}: weights {np.round(out['weights'], 3).tolist()} | "
        + " | ".join(f"{k} {v:.3f}" for k, v in out["metrics"].items())
    )
    if args.submission is not None:
        ensemble_submission(run_ids, out["weights"], args.data, args.split, args.submission, uri)
        print(
            f"{args.submission}: the ensemble's Submission.csv for split {args.split!r} of {args.data}"
        )
    return 0
