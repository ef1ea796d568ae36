"""What a Ray Train setting of `mg_ray/ray_env.py` saves a short training run, side by side.

    python benchmarks/bench_train_env.py                   # the controller's poll interval
    python benchmarks/bench_train_env.py --compare preemption-watcher --repeats 3
    python benchmarks/bench_train_env.py --epochs 8 --repeats 5

Runs `mg-ray train` (2 DDP workers, 1 CPU each, a local Ray cluster) on a tiny synthetic dataset
(the test suite's: 3 subjects x 10 classes, 40-frame clips), each repeat once with Ray Train's
default and once with mg-ray's value, interleaved. Prints, per setting, the wall seconds of the
whole command and of its training (from the "Started training worker group" line to the
command's summary line): min / median / max.

- `poll`: `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s (Ray's) against 0.2 s (mg-ray's). A worker's
  `ray.train.report` waits for the controller's next poll, and the controller handles a report
  (MLflow logging, Tune's result) only then.
- `preemption-watcher`: `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`, on (Ray's) against off (mg-ray's
  on a private local cluster). The watcher is one more actor process per worker group, started
  as training starts; it watches for node drains, which a private local cluster never has.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# comparison -> (the variable, {label: value}): Ray's default first, then mg-ray's
COMPARISONS = {
    "poll": (
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
        {"ray default (2 s)": "2", "mg-ray (0.2 s)": "0.2"},
    ),
    "preemption-watcher": (
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
        {"ray default (on)": "1", "mg-ray (off)": "0"},
    ),
}


def run_once(data: Path, home: Path, epochs: int, variable: str, value: str) -> tuple[float, float]:
    """(wall seconds of the command, seconds from the worker group's start to the summary)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"MG_RAY_HOME": str(home), variable: value}
    command = [sys.executable, "-m", "mg_ray.cli", "train", "--workers", "2"]
    command += ["--cpus-per-worker", "1", "--data", str(data), "--epochs", str(epochs)]
    command += ["--set", "data.test_clips=1", "--set", "optim.warmup_epochs=0", "--name", "bench"]
    start = time.monotonic()
    started = summary = None
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if started is None and "Started training worker group" in line:
                started = time.monotonic()
            if line.startswith("train bench:"):
                summary = time.monotonic()
    wall = time.monotonic() - start
    if proc.returncode != 0 or started is None or summary is None:
        raise SystemExit(f"mg-ray train failed (exit {proc.returncode}) with {variable}={value}")
    return wall, summary - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="poll")
    args = parser.parse_args()
    variable, settings = COMPARISONS[args.compare]

    from mg_ray.data import synth

    folder = Path(tempfile.mkdtemp(prefix="mg-ray-bench-train-env-"))
    data = synth.generate(
        folder / "tiny",
        seed=0,
        subjects=3,
        clips_per_class=1,
        frames=40,
        width=160,
        height=120,
        workers=1,
    )
    walls: dict[str, list[float]] = {name: [] for name in settings}
    training: dict[str, list[float]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name, value in settings.items():
            home = folder / f"home-{value}-{repeat}"
            wall, trained = run_once(data, home, args.epochs, variable, value)
            walls[name].append(wall)
            training[name].append(trained)
            print(f"repeat {repeat}, {name}: {wall:.1f} s wall, {trained:.1f} s training")

    def row(values: list[float]) -> str:
        return f"{min(values):5.1f} / {statistics.median(values):5.1f} / {max(values):5.1f}"

    print(f"\n{variable}: {args.epochs} epochs, 2 workers, {args.repeats} repeats")
    print(f"seconds min / median / max\n{'':20} {'whole command':>21}   {'training':>21}")
    for name in settings:
        print(f"{name:20} {row(walls[name]):>21}   {row(training[name]):>21}")
    for what, values in (("whole command", walls), ("training", training)):
        default, ours = (statistics.median(values[name]) for name in settings)
        print(f"{what}, median: {default / ours:.2f}x faster with mg-ray's value")


if __name__ == "__main__":
    main()
