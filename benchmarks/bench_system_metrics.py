"""What MLflow's system metrics cost a training process: the same CPU-bound work (small-preset
training steps from bench_model.py, one thread per process as a trial's worker has), timed side by side with the
monitor sampling into a run and without it.

    python benchmarks/bench_system_metrics.py                  # 5 rounds of each, interleaved
    python benchmarks/bench_system_metrics.py --rounds 7 --steps 60 --interval 1

Prints the median time of a round without the monitor, with it at the trial default interval
(`tracking.system_metrics_interval_s`, 10 s) and with it at `--interval` seconds, the ratios,
what the monitor's start and finish take (once per run, outside the timed steps), and the CPU
time the monitor itself uses in an otherwise idle process over `--idle-s` seconds (its cost to
the other processes of a node: a trial's monitor runs in the trial's actor, beside the
workers). Rounds are interleaved (off, on, fast, off, ...) so load drifts on a shared machine
hit all three alike. What runs is `mg_ray.tracking.system_metrics`, the context every trial's
function and `mg-ray train` wrap their work in, logging into a real sqlite MLflow store.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_model import make_step  # this folder is on sys.path when a benchmark runs

from mg_ray import tracking
from mg_ray.models import small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="training steps per round")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="the fast monitor's interval (s)"
    )
    parser.add_argument(
        "--idle-s", type=float, default=60.0, help="seconds of idle monitoring measured"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = tracking.client(uri)
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        # bench_model's small-preset step (forward + loss + backward) at batch 8
        step, _ = make_step(
            small,
            fusion=True,
            refinement=True,
            batch=8,
            rgb_size=64,
            num_classes=10,
            device="cpu",
            amp=False,
        )
        for _ in range(3):
            step()  # warm-up

        settings = {"off": None, "on (10 s)": 10.0, f"on ({args.interval:g} s)": args.interval}
        times: dict[str, list[float]] = {name: [] for name in settings}
        start_stop: list[float] = []  # the monitor's own start and finish, outside the timed steps
        for _ in range(args.rounds):
            for name, interval in settings.items():
                context = (
                    tracking.system_metrics(uri, run_id, interval_s=interval)
                    if interval
                    else contextlib.nullcontext()
                )
                entered = time.perf_counter()
                with context:
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[name].append(time.perf_counter() - started)
                    ended = time.perf_counter()
                if interval:
                    start_stop.append((started - entered) + (time.perf_counter() - ended))
        idle_cpu = {
            interval: monitor_cpu_s(uri, run_id, interval, args.idle_s)
            for interval in (10.0, args.interval)
        }
        samples = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))

    medians = {name: statistics.median(values) for name, values in times.items()}
    off = medians["off"]
    print(
        f"{args.rounds} rounds of {args.steps} small-preset training steps, 1 thread; "
        f"{samples} system-metric samples logged"
    )
    for name, value in medians.items():
        print(f"  {name:>12}: {value:7.2f} s  (ratio to off {value / off:.3f})")
    print(
        f"  the monitor's start + finish: median {statistics.median(start_stop):.2f} s (once per run)"
    )
    for interval, used in idle_cpu.items():
        print(
            f"  the monitor's own CPU at {interval:g} s: {used:.3f} CPU-s in {args.idle_s:g} s "
            f"({100 * used / args.idle_s:.2f} % of a core)"
        )


def monitor_cpu_s(uri: str, run_id: str, interval: float, seconds: float) -> float:
    """CPU seconds this process uses while it only runs the monitor for `seconds`."""

    def used() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = used()
    with tracking.system_metrics(uri, run_id, interval_s=interval):
        time.sleep(seconds)
    return used() - before


if __name__ == "__main__":
    main()
