"""A trial's data setup on its Ray Train workers, on an iMiGUE-size index: before and after the
index was shared.

    python benchmarks/bench_worker_setup.py [--clips 18232] [--frames 90] [--repeats 3]

Writes a skeleton-only dataset of iMiGUE's size in MiGA's format (one pickle per split: 12,893 /
777 / 4,562 clips of 90 frames x 22 joints, about 420 MB of keypoints) into a temporary folder,
then on a private local Ray cluster of 2 CPUs runs, side by side, a 2-worker `TorchTrainer`
(the project's `build_trainer`) whose workers do what `train_loop_per_worker` does to its data,
three ways:

- **per split** (the code before this bench): every worker loads and validates the index for
  each split it reads (train, val, and test in the last epoch);
- **per worker** (`mg-ray train` without a shared index, `fit(index=None)`): `Data.build` loads it
  once, and the test split reuses it;
- **shared** (a study, and `mg-ray train`): the driver put the index it had checked into the
  object store once; `Data.build` takes it from there (`SharedIndex`), its arrays read-only in
  the node's shared memory.

Prints each way's seconds per worker (the slower of the two, min/median over repeats) and the
memory a worker grew by (its peak RSS after the setup less before), plus the driver's one-off
costs: its own load and check, the object-store put, and the dataset fingerprint that each
trial's run used to compute for itself. Then the real `train_loop_per_worker` (`fit()`: one
epoch of a pose-only small model on 32-clip splits the pickles also name), whose
`worker_setup_s` metric (imports, data, model, resume) is printed for the two ways the code
still has (the per-split way is gone from it).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIGA_SPLITS = {"train": 12893, "val": 777, "test": 4562}  # REFERENCE.md section 1
BENCH_SPLIT = 32  # clips of each bench_<split>: the real loop's one epoch stays short


def write_miga(root: Path, clips: int, frames: int, joints: int = 22) -> None:
    """A MiGA-format folder: classes.txt and train/val/test.pkl, each with its own split dict."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(32)))
    rng = np.random.default_rng(0)
    total, n = sum(MIGA_SPLITS.values()), 0
    for split, count in MIGA_SPLITS.items():
        entries = []
        for _ in range(max(1, round(count * clips / total))):
            entries.append(
                {
                    "frame_dir": f"{n // 40:04d}_{n % 40}",
                    "label": int(rng.integers(32)),
                    "img_shape": (1080, 1920),
                    "original_shape": (1080, 1920),
                    "total_frames": frames,
                    "keypoint": rng.uniform(0, 1000, (1, frames, joints, 2)).astype(np.float32),
                    "keypoint_score": rng.uniform(0, 1, (1, frames, joints)).astype(np.float32),
                }
            )
            n += 1
        with open(root / f"{split}.pkl", "wb") as f:
            names = [e["frame_dir"] for e in entries]
            splits = {split: names, f"bench_{split}": names[:BENCH_SPLIT]}
            pickle.dump({"split": splits, "annotations": entries}, f, protocol=4)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup_on_a_worker(config: dict, way: str) -> None:
    """One worker's data setup, done `way`; reports the slower worker's seconds and the larger
    RSS growth (Ray Train keeps rank 0's report: the ranks agree on them first)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from mg_ray.data import build_dataset
    from mg_ray.train.loop import Data

    cfg = config["experiment"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rss, started = peak_rss_mb(), time.perf_counter()
    # Kept alive as in the loop: the training and validation sets for the whole run, the test
    # set built beside them in the last epoch.
    if way == "per split":
        kept = [
            build_dataset(cfg.data, cfg.data.train_split, "train", rgb=False),
            build_dataset(cfg.data, cfg.data.val_split, "test", rgb=False),
        ]
        kept.append(build_dataset(cfg.data, cfg.data.test_split, "test", rgb=False))
    else:
        kept = [Data.build(cfg, rank, world, torch.device("cpu"), config["index"])]
        kept.append(
            build_dataset(cfg.data, cfg.data.test_split, "test", rgb=False, index=kept[0].index)
        )
    measured = torch.tensor([time.perf_counter() - started, peak_rss_mb() - rss])
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    with tempfile.TemporaryDirectory() as folder:  # Ray Train keeps the metrics of checkpoints
        checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(
            {"setup_s": float(measured[0]), "rss_mb": float(measured[1])}, checkpoint=checkpoint
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=sum(MIGA_SPLITS.values()))
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from mg_ray import tracking
    from mg_ray.cluster import init_ray
    from mg_ray.data.check import ensure_dataset
    from mg_ray.data.video_io import dataset_fingerprint
    from mg_ray.train.config import load_config
    from mg_ray.train.loop import SharedIndex
    from mg_ray.train.trainer import build_trainer, fit

    with tempfile.TemporaryDirectory(prefix="bench-worker-setup-") as folder:
        folder = Path(folder)
        root = folder / "miga"
        write_miga(root, args.clips, args.frames)
        size = sum(p.stat().st_size for p in root.glob("*.pkl")) / 2**20
        cfg = load_config(
            "small",
            {
                "data.root": str(root),
                "data.num_workers": 0,
                "model.modality": "pose",
                "resources.num_workers": 2,
                "resources.cpus_per_worker": 1,
                "tracking.experiment": "bench",
            },
        )
        started = time.perf_counter()
        index = ensure_dataset(cfg.data, rgb=False)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        fingerprint_s = (dataset_fingerprint(root), time.perf_counter() - started)[1]

        init_ray(num_cpus=2)
        started = time.perf_counter()
        shared = SharedIndex.put(cfg.data, index)
        put_s = time.perf_counter() - started
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = tracking.client(uri)
        run_id, _ = tracking.start_or_resume_run(
            client, tracking.get_or_create_experiment(client, "bench"), "bench"
        )
        ways = ("per split", "per worker", "shared")
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        grown: dict[str, list[float]] = {way: [] for way in ways}
        for repeat in range(args.repeats):
            for way in ways:  # interleaved: the machine's noise falls on every way alike
                trainer = build_trainer(
                    cfg,
                    name=f"{way.replace(' ', '_')}_{repeat}",
                    storage_path=folder / "train",
                    tracking_uri=uri,
                    run_id=run_id,
                    index=shared if way == "shared" else None,
                    train_loop=partial(setup_on_a_worker, way=way),
                )
                metrics = trainer.fit().metrics
                seconds[way].append(metrics["setup_s"])
                grown[way].append(metrics["rss_mb"])

        # The real loop, its own `worker_setup_s` (imports, data, model, resume): one epoch of
        # a pose-only small model on 32-clip splits of the same index.
        loop_cfg = load_config(
            "small",
            {
                **{f"data.{k}_split": f"bench_{k}" for k in ("train", "val", "test")},
                "data.root": str(root),
                "data.num_workers": 0,
                "data.test_clips": 1,
                "model.modality": "pose",
                "optim.epochs": 1,
                "optim.warmup_epochs": 0,
                "optim.milestones": [1],
                "resources.num_workers": 2,
                "resources.cpus_per_worker": 1,
                "tracking.experiment": "bench",
                "tracking.system_metrics": False,
            },
        )
        loop_ways = ("per worker", "shared")
        loop_setup: dict[str, list[float]] = {way: [] for way in loop_ways}
        for repeat in range(args.repeats):
            for way in loop_ways:
                name = f"loop_{way.replace(' ', '_')}_{repeat}"
                loop_run, _ = tracking.start_or_resume_run(
                    client, tracking.get_or_create_experiment(client, "bench"), name
                )
                outcome = fit(
                    loop_cfg,
                    name=name,
                    storage_path=folder / "train",
                    tracking_uri=uri,
                    run_id=loop_run,
                    index=shared if way == "shared" else None,
                )
                loop_setup[way].append(outcome.metrics["worker_setup_s"])
        ray.shutdown()

    print(
        f"index: {args.clips} clips x {args.frames} frames x 22 joints, {size:.0f} MB of pickles; "
        f"2 workers x 1 CPU, {args.repeats} repeats"
    )
    print(
        f"driver, once per study: load and check {load_s:.2f} s, object-store put {put_s:.2f} s, "
        f"fingerprint {fingerprint_s:.2f} s (before: once per trial)"
    )
    base = statistics.median(seconds["per split"])
    for way in ways:
        s = seconds[way]
        print(
            f"{way:>10}: data setup per worker min {min(s):.2f} / median {statistics.median(s):.2f} s "
            f"({base / statistics.median(s):.1f}x faster than per split), "
            f"worker RSS +{statistics.median(grown[way]):.0f} MB"
        )
    print("the real loop's worker_setup_s (rank 0; pose-only small model, 32-clip splits):")
    for way in loop_ways:
        s = loop_setup[way]
        print(f"{way:>10}: min {min(s):.2f} / median {statistics.median(s):.2f} s")


if __name__ == "__main__":
    main()
