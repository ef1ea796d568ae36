"""Per-trial orchestration overhead of a study: trial wall time minus training and evaluation.

    python benchmarks/bench_trial_overhead.py                      # quick.yaml, 3 trials, 1 epoch
    python benchmarks/bench_trial_overhead.py --trials 4 --epochs 2

Runs the same study (same seed, so the same trial configurations) twice on one local Ray
cluster, with sqlite MLflow in a temporary MG_RAY_HOME (the synthetic dataset is taken from
~/.mg-ray, or generated there once): first with `standby_trials: 0` (one trial at a time, each
starting up after the last one ended), then with `standby_trials: 1` (the next trial starts up
while the current one trains). ASHA's grace period is set to the epoch count, so every trial runs
all its epochs. A Tune callback on the driver times each trial from `on_trial_start` to
`on_trial_complete` and sums the work its workers report: `train_epoch_s` and `val_s` of every
epoch plus `test_s`. Prints per trial, then per study:

    overhead per trial = (study wall - sum of the trials' work) / trials     (target: < 10 s)

For standby 0 this equals the mean of (trial wall - trial work) plus the gaps between trials:
starting the Train controller and worker group (processes, imports, process group), building
datasets and the model, MLflow bookkeeping, checkpoints and teardown. `worker setup` (the loop's
entry to its first epoch) is the part spent inside the workers.
"""

from __future__ import annotations

import argparse
import os
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

    init_ray()
    summary = []
    for standby in (0, 1):
        space.study.standby_trials = standby
        timer = Timer()
        started = time.perf_counter()
        run_study(space, study_name=f"bench-standby{standby}", data_root=str(dataset),
                  num_trials=args.trials, promote=False, verbose=0, callbacks=[timer])
        wall = time.perf_counter() - started
        work = sum(timer.work.values())
        print(f"\nstandby_trials {standby}: {args.trials} trials x {args.epochs} epoch(s), study wall {wall:.1f} s")
        print(f"{'trial':10} {'wall s':>8} {'work s':>8} {'wall-work s':>12} {'worker setup s':>15}")
        for trial in sorted(timer.end, key=timer.start.get):
            trial_wall = timer.end[trial] - timer.start[trial]
            print(f"{trial:10} {trial_wall:8.1f} {timer.work.get(trial, 0.0):8.1f} "
                  f"{trial_wall - timer.work.get(trial, 0.0):12.1f} {timer.worker_setup.get(trial, float('nan')):15.1f}")
        summary.append((standby, wall, work, (wall - work) / args.trials))

    print(f"\n{'standby':>7} {'study wall s':>12} {'work s':>8} {'overhead per trial s':>21}")
    for standby, wall, work, overhead in summary:
        print(f"{standby:7d} {wall:12.1f} {work:8.1f} {overhead:21.1f}")
    print(f"overhead per trial, standby 1 vs 0: {summary[1][3] / summary[0][3]:.2f}x (target: < 10 s per trial)")


if __name__ == "__main__":
    main()
