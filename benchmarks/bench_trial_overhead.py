"""Per-trial orchestration overhead of a study: trial wall time minus training and evaluation.

    python benchmarks/bench_trial_overhead.py                 # quick.yaml, 1-epoch trials
    python benchmarks/bench_trial_overhead.py --epochs 2 --sizes 2 8

Runs studies of the same space (same seed, so the same trial configurations) one after the other
on one local Ray cluster, with sqlite MLflow in a temporary MG_RAY_HOME (the synthetic dataset is
taken from ~/.mg-ray, or generated there once). ASHA's grace period is set to the epoch count, so
every trial runs all its epochs. A Tune callback on the driver sums the work the workers report
for each trial: `train_epoch_s` and `val_s` of every epoch plus `test_s`. For each study:

    overhead = study wall - sum of the trials' work

which is everything else: the processes Ray Train starts for every run (the workers and a
synchronization actor) and their imports, process groups, datasets and models, MLflow,
checkpoints, teardown, the trial driver's start-up (once per driver process: Tune reuses it), and
the study's own start (Tuner, searcher, MLflow parent run) and end (summary, plots).

The studies:
- `standby_trials: 0`, `--trials` trials: one trial at a time, each starting after the last one
  ended: overhead / trials is what a trial costs on its own.
- the space's own settings (standby trials, trial stagger) at two sizes, `--sizes N1 N2`: the
  overhead grows by the same amount with every trial, so

      per-trial overhead = (overhead(N2) - overhead(N1)) / (N2 - N1)        (target: < 10 s)
      per-study overhead = overhead(N1) - N1 x per-trial overhead

  The per-study part is paid once, however many trials a study has.

The difference of two studies' overheads is noisy on a shared machine (each is a sum over many
seconds of noise). So each study also measures the same thing directly: on 2 CPUs one trial
trains at a time, and every second between one trial's last work (its test evaluation) and the
next trial's first batch is orchestration. The workers report the wall-clock time their first
epoch started (`training_started_at`); a trial's work ends `work` seconds later. The mean of
those gaps over a study is its per-trial overhead, printed as `mean gap`.

Neither figure sees the CPU that a standby trial's start-up (its MLflow run and, the first time,
its driver process), when the space has `standby_trials`, takes from the trial that trains beside
it: that shows as slower work. The studies
draw the same configurations (same seed), so the benchmark also prints how much longer the work
of a configuration took in the studies than alone, and the per-trial cost with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


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
    from mg_ray.cluster import init_ray
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
            self.training_started: dict[str, float] = {}  # wall clock (time.time())
            self.config: dict[str, str] = {}
            self.driver_pids: set[int] = set()  # Tune reuses trial actors: fewer than trials

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start[trial.trial_id] = time.perf_counter()
            self.config[trial.trial_id] = json.dumps(trial.config, sort_keys=True, default=str)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            work = sum(result.get(k, 0.0) for k in ("train_epoch_s", "val_s", "test_s"))
            self.work[trial.trial_id] = self.work.get(trial.trial_id, 0.0) + work
            if "worker_setup_s" in result:
                self.worker_setup[trial.trial_id] = result["worker_setup_s"]
            if "training_started_at" in result:
                self.training_started[trial.trial_id] = result["training_started_at"]
            if "pid" in result:
                self.driver_pids.add(result["pid"])

        def gaps(self) -> list[float]:
            """Seconds from each trial's last work to the next trial's first batch."""
            order = sorted(self.training_started, key=self.training_started.get)
            return [self.training_started[b] - (self.training_started[a] + self.work[a])
                    for a, b in zip(order, order[1:])]

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.perf_counter()

        def work_by_config(self) -> dict[str, float]:
            return {self.config[t]: work for t, work in self.work.items()}

    def study(name: str, trials: int, **settings) -> tuple[float, list[float], dict[str, float]]:
        """Runs one study; prints its trials; returns its overhead (wall - work) in seconds, the
        gaps between consecutive trials' work, and each configuration's work."""
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
              f"wall {wall:.1f} s, work {work:.1f} s, overhead {wall - work:.1f} s; "
              f"{len(timer.driver_pids)} trial driver process(es)")
        print(f"{'trial':10} {'wall s':>8} {'work s':>8} {'wall-work s':>12} {'worker setup s':>15}")
        for trial in sorted(timer.end, key=timer.start.get):
            trial_wall = timer.end[trial] - timer.start[trial]
            print(f"{trial:10} {trial_wall:8.1f} {timer.work.get(trial, 0.0):8.1f} "
                  f"{trial_wall - timer.work.get(trial, 0.0):12.1f} {timer.worker_setup.get(trial, float('nan')):15.1f}")
        gaps = timer.gaps()
        print("gaps between one trial's last work and the next one's first batch: "
              + ", ".join(f"{gap:.1f}" for gap in gaps) + f" s (mean {mean(gaps):.1f} s)")
        return wall - work, gaps, timer.work_by_config()

    init_ray()
    alone, alone_gaps, alone_work = study("alone", args.trials, standby_trials=0, trial_stagger_s=0.0)
    small, small_gaps, small_work = study(f"study-{n1}", n1)
    large, large_gaps, large_work = study(f"study-{n2}", n2)
    per_trial = (large - small) / (n2 - n1)
    gaps = small_gaps + large_gaps
    # The same configurations (same seed) trained alone and in the studies, where a standby
    # trial starts up beside the running one: the CPU that start-up takes shows as slower work.
    slowdown = [work[config] - alone_work[config] for work in (small_work, large_work)
                for config in work if config in alone_work]
    print(f"\none trial at a time (standby 0):          {alone / args.trials:5.1f} s overhead per trial, "
          f"mean gap {mean(alone_gaps):.1f} s")
    print(f"{args.space} settings, {n1} and {n2} trials:  {small / n1:5.1f} and {large / n2:5.1f} s overhead per trial")
    print(f"  per-study overhead (paid once):          {small - n1 * per_trial:5.1f} s")
    print(f"  per-trial overhead, from the difference: {per_trial:5.1f} s   (target: < 10 s)")
    print(f"  per-trial overhead, mean gap:            {mean(gaps):5.1f} s   (target: < 10 s; {len(gaps)} gaps, "
          f"{min(gaps):.1f}-{max(gaps):.1f} s; {mean(alone_gaps) / mean(gaps):.1f}x less than one trial at a time)")
    if not space.study.standby_trials:  # one trial at a time: nothing starts up beside training
        print(f"  no standby trials, so nothing starts up beside a trial's training (the work of the same "
              f"configurations differed from the first study's by {mean(slowdown):+.1f} s)")
        return
    print(f"  work of a trial beside a standby start-up: {mean(slowdown):+5.1f} s against the same configuration "
          f"alone ({len(slowdown)} trials)")
    print(f"  per-trial cost, mean gap + that:         {mean(gaps) + mean(slowdown):5.1f} s   "
          f"(one trial at a time: {mean(alone_gaps):.1f} s)")


if __name__ == "__main__":
    main()
