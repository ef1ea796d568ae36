"""Per-trial orchestration overhead of a study, side by side with a bare Ray Train trial.

    python benchmarks/bench_trial_overhead.py                 # quick.yaml's fused stage, 4 trials x 2 epochs
    python benchmarks/bench_trial_overhead.py --trials 6 --standby 0

Runs, on one local Ray cluster, with sqlite MLflow in a temporary MG_RAY_HOME (the synthetic
dataset is taken from ~/.mg-ray, or generated there once):

- **bare**: Ray's documented Tune-over-Train pattern and nothing else: a function trainable per
  trial that builds a `TorchTrainer` around the same per-worker loop with Ray's
  `TuneReportCallback` and calls `fit()`, with the same searcher (OptunaSearch, same seed, so the
  same configurations) and the same concurrency; no MLflow, no ASHA, no callbacks of ours;
- **mg-ray**: `run_study` on the same space (ASHA's grace period set to the epoch count, so every
  trial runs all its epochs): the MLflow run tree, the controller's logging, the summary.

The overhead of a trial is measured directly: on 2 CPUs one trial trains at a time, and every
second between one trial's last work (its test evaluation) and the next trial's first batch is
orchestration. The workers report the wall-clock time their first epoch started
(`training_started_at`) and the seconds they worked (`train_epoch_s`, `val_s`, `test_s`); the
mean of the gaps over a study is its per-trial overhead. Wall time less work is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import pairwise
from pathlib import Path


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quick.yaml")
    parser.add_argument(
        "--stage",
        help="of a pipeline file, the stage whose study is run (default: the stage "
        "it registers); its `init` is dropped: the trials train from scratch",
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="epochs per trial (with 1, the controller's start of MLflow at the first "
        "report falls between two trials)",
    )
    parser.add_argument("--standby", type=int, help="standby trials (default: the space's)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mg-ray-bench-"))
    dataset = Path(os.environ.get("MG_RAY_HOME", "~/.mg-ray")).expanduser() / "datasets" / "synth"
    os.environ["MG_RAY_HOME"] = str(home)  # fresh MLflow store, Ray results, Optuna storage
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import ray
    from ray import tune

    from mg_ray.cluster import init_ray
    from mg_ray.data.synth import generate
    from mg_ray.tune.space import Pipeline, load_space
    from mg_ray.tune.study import max_concurrent_trials, run_study

    space = load_space(args.space)
    if isinstance(space, Pipeline):
        stage = args.stage or space.register_stage
        if stage not in space.stages:
            parser.error(f"--stage {stage}: {args.space} has the stages {', '.join(space.stages)}")
        space = space.stage_space(stage)
    elif args.stage:
        parser.error(f"--stage: {args.space} is a single study, not a pipeline of stages")
    if not dataset.exists():  # after the arguments are checked: generating it takes minutes
        generate(dataset)
    space.fixed.update(
        {
            "optim.epochs": args.epochs,
            "optim.milestones": [args.epochs],
            "optim.warmup_epochs": 0,
            "data.root": str(dataset),
        }
    )
    space.study.asha.grace_period = args.epochs  # no early stopping: every trial runs to the end
    space.study.time_budget_s = None
    space.study.num_trials = args.trials
    if args.standby is not None:
        space.study.standby_trials = args.standby

    class Timer(tune.Callback):
        def __init__(self) -> None:
            self.work: dict[str, float] = {}
            self.training_started: dict[str, float] = {}  # wall clock (time.time())
            self.config: dict[str, str] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.config[trial.trial_id] = json.dumps(trial.config, sort_keys=True, default=str)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            work = sum(result.get(k, 0.0) for k in ("train_epoch_s", "val_s", "test_s"))
            self.work[trial.trial_id] = self.work.get(trial.trial_id, 0.0) + work
            if "training_started_at" in result:
                self.training_started[trial.trial_id] = result["training_started_at"]

        def gaps(self) -> list[float]:
            """Seconds from each trial's last work to the next trial's first batch."""
            order = sorted(self.training_started, key=self.training_started.get)
            return [
                self.training_started[b] - (self.training_started[a] + self.work[a])
                for a, b in pairwise(order)
            ]

    def report(name: str, wall: float, timer: Timer) -> list[float]:
        gaps, work = timer.gaps(), sum(timer.work.values())
        print(
            f"\n{name}: {len(timer.work)} trials x {args.epochs} epoch(s): wall {wall:.1f} s, work {work:.1f} s, "
            f"wall - work {wall - work:.1f} s ({(wall - work) / max(1, len(timer.work)):.1f} s per trial)"
        )
        print(
            "  gaps between one trial's last work and the next one's first batch: "
            + ", ".join(f"{gap:.1f}" for gap in gaps)
            + f" s (mean {mean(gaps):.1f} s)"
        )
        return gaps

    init_ray()
    bare_timer, started = Timer(), time.perf_counter()
    bare_study(space, bare_timer)
    bare_gaps = report("bare Ray Train trials", time.perf_counter() - started, bare_timer)

    timer, started = Timer(), time.perf_counter()
    run_study(space, study_name="bench", promote=False, verbose=0, callbacks=[timer])
    gaps = report("mg-ray study", time.perf_counter() - started, timer)

    concurrency = max_concurrent_trials(space, _probe(space), ray.cluster_resources())
    print(
        f"\nper-trial overhead (mean gap), side by side in one run; {concurrency} trial(s) at a time "
        f"(standby_trials {space.study.standby_trials}):"
    )
    print(f"  bare Ray Train trial: {mean(bare_gaps):5.1f} s")
    print(
        f"  mg-ray trial:         {mean(gaps):5.1f} s   ({mean(gaps) / mean(bare_gaps):.2f}x the bare trial; "
        f"{mean(gaps) - mean(bare_gaps):+.1f} s)"
    )


def _probe(space):
    from mg_ray.config import apply_overrides, from_mapping
    from mg_ray.train.config import ExperimentConfig
    from mg_ray.tune.space import base_config_dict, trial_overrides

    return from_mapping(
        ExperimentConfig, apply_overrides(base_config_dict(space), trial_overrides(space, {}))
    )


def bare_trial(config: dict, space) -> None:
    """Ray's documented pattern: a TorchTrainer per trial, reporting through TuneReportCallback."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from mg_ray.config import apply_overrides, from_mapping
    from mg_ray.train.config import ExperimentConfig
    from mg_ray.train.loop import train_loop_per_worker
    from mg_ray.tune.space import base_config_dict, trial_overrides

    params = {k: v for k, v in config.items() if "|" not in k}
    cfg = from_mapping(
        ExperimentConfig, apply_overrides(base_config_dict(space), trial_overrides(space, params))
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg, "tracking_uri": ""},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers,
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"bare_{tune.get_context().get_trial_id()}",
            storage_path=str(Path(os.environ["MG_RAY_HOME"]) / "bare_train"),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def bare_study(space, timer) -> None:
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from mg_ray.tune.study import max_concurrent_trials

    searcher = OptunaSearch(
        space.sample,
        metric=space.study.metric,
        mode=space.study.mode,
        storage=optuna.storages.RDBStorage(f"sqlite:///{os.environ['MG_RAY_HOME']}/bare.db"),
        study_name="bare",
        seed=space.study.seed,
    )
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(bare_trial, space=space), {"cpu": space.study.trial_driver_cpus}
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=space.study.num_trials,
            max_concurrent_trials=max_concurrent_trials(
                space, _probe(space), ray.cluster_resources()
            ),
        ),
        run_config=tune.RunConfig(
            name="bare",
            storage_path=str(Path(os.environ["MG_RAY_HOME"]) / "bare_tune"),
            callbacks=[timer],
            verbose=0,
        ),
    )
    tuner.fit()


if __name__ == "__main__":
    main()
