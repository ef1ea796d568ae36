"""Per-trial orchestration overhead of a study: trial wall time minus training and evaluation.

    python benchmarks/bench_trial_overhead.py                 # quick.yaml, 1-epoch trials
    python benchmarks/bench_trial_overhead.py --epochs 2 --sizes 2 8

Runs studies of the same space (same seed, so the same trial configurations) one after the other
on one local Ray cluster, with sqlite MLflow in a temporary MG_RAY_HOME (the synthetic dataset is
taken from ~/.mg-ray, or generated there once). ASHA's grace period is set to the epoch count, so
every trial runs all its epochs. A Tune callback on the driver sums the work the workers report
for each trial: `train_epoch_s` and `val_s` of every epoch plus `test_s`. For each study:

    overhead = study wall - sum of the trials' work

which is everything else: processes and imports of the trial driver, the Train controller and the
workers, process groups, datasets and models, MLflow, checkpoints, teardown, and the study's own
start (Tuner, searcher, MLflow parent run) and end (summary, plots).

The studies:
- `standby_trials: 0`, `--trials` trials: one trial at a time, each starting after the last one
  ended: overhead / trials is what a trial costs on its own.
- the space's own settings (standby trials, trial stagger) at two sizes, `--sizes N1 N2`: the
  overhead grows by the same amount with every trial, so

      per-trial overhead = (overhead(N2) - overhead(N1)) / (N2 - N1)        (target: < 10 s)
      per-study overhead = overhead(N1) - N1 x per-trial overhead

  The per-study part is paid once, however many trials a study has.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quick.yaml")
    parser.add_argument("--trials", type=int, default=3, help="trials of the standby 0 study")
    parser.add_argument("--sizes", type=int, nargs=2, default=(2, 6), metavar=("N1", "N2"),
                        help="trials of the two studies run with the space's own settings")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    n1, n2 = args.sizes
    if not 1 <= n1 < n2:
        parser.error("--sizes needs 1 <= N1 < N2")

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

    def study(name: str, trials: int, **settings) -> float:
        """Runs one study; prints its trials; returns its overhead (wall - work) in seconds."""
        run_space = copy.deepcopy(space)
        for key, value in settings.items():
            setattr(run_space.study, key, value)
        timer = Timer()
        started = time.perf_counter()
        run_study(run_space, study_name=name, data_root=str(dataset), num_trials=trials,
                  promote=False, verbose=0, callbacks=[timer])
        wall = time.perf_counter() - started
        work = sum(timer.work.values())
        print(f"\n{name}: {trials} trials x {args.epochs} epoch(s), standby_trials "
              f"{run_space.study.standby_trials}, trial_stagger_s {getattr(run_space.study, 'trial_stagger_s', 0):g}: "
              f"wall {wall:.1f} s, work {work:.1f} s, overhead {wall - work:.1f} s")
        print(f"{'trial':10} {'wall s':>8} {'work s':>8} {'wall-work s':>12} {'worker setup s':>15}")
        for trial in sorted(timer.end, key=timer.start.get):
            trial_wall = timer.end[trial] - timer.start[trial]
            print(f"{trial:10} {trial_wall:8.1f} {timer.work.get(trial, 0.0):8.1f} "
                  f"{trial_wall - timer.work.get(trial, 0.0):12.1f} {timer.worker_setup.get(trial, float('nan')):15.1f}")
        return wall - work

    init_ray()
    alone = study("alone", args.trials, standby_trials=0, trial_stagger_s=0.0)
    small = study(f"study-{n1}", n1)
    large = study(f"study-{n2}", n2)
    per_trial = (large - small) / (n2 - n1)
    print(f"\none trial at a time (standby 0):          {alone / args.trials:5.1f} s overhead per trial")
    print(f"{args.space} settings, {n1} and {n2} trials:  {small / n1:5.1f} and {large / n2:5.1f} s overhead per trial")
    print(f"  per-study overhead (paid once):          {small - n1 * per_trial:5.1f} s")
    ratio = f"{alone / args.trials / per_trial:.1f}x less than" if per_trial > 0 else "noise: not comparable with"
    print(f"  per-trial overhead:                      {per_trial:5.1f} s   (target: < 10 s; "
          f"{ratio} one trial at a time)")


if __name__ == "__main__":
    main()
