"""Training throughput of the small preset on Ray Train: 1 worker vs 2 DDP workers.

    python benchmarks/bench_train.py                 # 2 epochs each, synthetic dataset
    python benchmarks/bench_train.py --epochs 3

Both runs get the same 2 CPUs: 1 worker x 2 CPUs (2 torch threads) and 2 workers x 1 CPU
(gloo DDP), each with one DataLoader process. They run one after the other on a local Ray
cluster, with a temporary MG_RAY_HOME for MLflow and checkpoints (the synthetic dataset is taken
from ~/.mg-ray, or generated there once). Prints, for the last epoch of each run:

    samples/s    the whole split over the epoch's wall time (all workers together)
    per worker   samples/s of one worker
    data wait    fraction of the epoch a worker spent waiting for its DataLoader
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    dataset = Path(os.environ.get("MG_RAY_HOME", "~/.mg-ray")).expanduser() / "datasets" / "synth"
    os.environ["MG_RAY_HOME"] = tempfile.mkdtemp(prefix="mg-ray-bench-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from mg_ray import paths
    from mg_ray.cluster import init_ray
    from mg_ray.data.synth import generate
    from mg_ray.train.config import load_config
    from mg_ray.train.trainer import train

    if not dataset.exists():
        generate(dataset)
    init_ray()
    rows = []
    for workers, cpus in ((1, 2.0), (2, 1.0)):
        cfg = load_config(
            "small",
            {
                "data.root": str(dataset),
                "optim.epochs": args.epochs,
                "optim.milestones": [args.epochs],
                "optim.warmup_epochs": 0,
                "resources.num_workers": workers,
                "resources.cpus_per_worker": cpus,
                "data.test_split": None,
            },
        )
        outcome = train(cfg, name=f"bench-{workers}w", storage_path=paths.ray_storage())
        m = outcome.metrics
        rows.append(
            (
                workers,
                cpus,
                m["train_samples_per_s"] * workers,
                m["train_samples_per_s"],
                m["train_data_wait_frac"],
                m["train_epoch_s"],
            )
        )
    print(f"\nsmall preset, batch {cfg.optim.batch_size}, last of {args.epochs} epochs")
    print(
        f"{'workers':>7} {'CPUs each':>9} {'samples/s':>10} {'per worker':>10} {'data wait':>9} {'epoch s':>8}"
    )
    for workers, cpus, total, per_worker, wait, epoch_s in rows:
        print(
            f"{workers:7d} {cpus:9.1f} {total:10.1f} {per_worker:10.1f} {wait:9.1%} {epoch_s:8.1f}"
        )
    print(f"2 workers / 1 worker throughput: {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
