"""Per-trial orchestration overhead of a study: trial wall time minus training and evaluation.

    python benchmarks/bench_trial_overhead.py                      # quick.yaml, 3 trials, 1 epoch
    python benchmarks/bench_trial_overhead.py --trials 4 --epochs 2

Runs a real study (local Ray, sqlite MLflow in a temporary MG_RAY_HOME; the synthetic dataset is
taken from ~/.mg-ray, or generated once there) with ASHA's grace period at the epoch count, so
every trial runs all its epochs. A Tune callback on the driver times each trial from Tune's
`on_trial_start` to `on_trial_complete`, and sums what the workers report as work:
`train_epoch_s` and `val_s` of every epoch plus `test_s`. Prints per trial, then the means:

    overhead = trial wall - (train + val + test)        (target: < 10 s per trial)
    gap      = time from one trial's end to the next one's start (trials run one at a time here)

The overhead includes starting the Train controller and the worker group (processes, imports,
process group), building datasets and the model, MLflow run bookkeeping, checkpoints and
teardown. `worker_setup_s` (from the loop's entry to its first epoch) is printed as the part of
it spent inside the workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quick.yaml")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mg-ray-bench-"))
    dataset = Path(os.environ.get("MG_RAY_HOME", "~/.mg-ray")).expanduser() / "datasets" / "synth"
    os.environ["MG_RAY_HOME"] = str(home)  # fresh MLflow store, Ray results, Optuna storage
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from ray.tune import Callback

    from mg_ray.data.synth import generate
    from mg_ray.train.trainer import init_ray
    from mg_ray.tune.space import load_space
    from mg_ray.tune.study import run_study

    if not dataset.exists():
        generate(dataset)
    space = load_space(args.space)
    space.fixed.update({"optim.epochs": args.epochs, "optim.milestones": [args.epochs], "optim.warmup_epochs": 0})
    space.study.asha.grace_period = args.epochs  # no early stopping: every trial runs to the end
    space.study.time_budget_s = None

    class Timer(Callback):
        def __init__(self) -> None:
            self.start: dict[str, float] = {}
            self.end: dict[str, float] = {}
            self.work: dict[str, float] = {}
            self.worker_setup: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start[trial.trial_id] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            work = sum(result.get(k, 0.0) for k in ("train_epoch_s", "val_s", "test_s"))
            self.work[trial.trial_id] = self.work.get(trial.trial_id, 0.0) + work
            if "worker_setup_s" in result:
                self.worker_setup[trial.trial_id] = result["worker_setup_s"]

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.perf_counter()

    timer = Timer()
    init_ray()
    started = time.perf_counter()
    run_study(space, study_name="bench", data_root=str(dataset), num_trials=args.trials,
              promote=False, verbose=0, callbacks=[timer])
    study_wall = time.perf_counter() - started

    print(f"\n{args.trials} trials x {args.epochs} epoch(s), {space.source}; study wall {study_wall:.1f} s")
    print(f"{'trial':10} {'wall s':>8} {'work s':>8} {'overhead s':>11} {'worker setup s':>15}")
    order = sorted(timer.end, key=timer.start.get)
    overheads, gaps = [], []
    for i, trial in enumerate(order):
        wall = timer.end[trial] - timer.start[trial]
        overheads.append(wall - timer.work.get(trial, 0.0))
        print(f"{trial:10} {wall:8.1f} {timer.work.get(trial, 0.0):8.1f} {overheads[-1]:11.1f} "
              f"{timer.worker_setup.get(trial, float('nan')):15.1f}")
        if i:
            gaps.append(timer.start[trial] - timer.end[order[i - 1]])
    print(f"mean per-trial overhead {statistics.mean(overheads):.1f} s (target < 10 s)")
    if gaps:
        print(f"mean gap between trials {statistics.mean(gaps):.1f} s")


if __name__ == "__main__":
    main()
