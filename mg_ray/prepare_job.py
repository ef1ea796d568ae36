"""`mg-ray prepare`: `mg_ray.data.prepare` with its per-clip work on Ray Data over the cluster.

    mg-ray prepare --src DIR --out NEW [--store video|jpeg|uint8] [--workers N]

Each clip is one row of a Ray Data dataset mapped by `prepare_clip` (one CPU each), so every
node's cores decode and encode at once; Ray Data prints its progress bar, and the driver writes
each clip's line to the stage's journal as its result arrives, so an interrupted run resumes
where it stopped (`mg_ray.data.prepare.open_stage`). The cluster is RAY_ADDRESS's, else a
private local one of `--workers` CPUs. On a cluster of several nodes, `--src` and `--out` must be
on storage every node sees: the workers read and write the files themselves.
`mg-ray convert-imigue --videos` cuts its long videos the same way (`mg_ray.convert_job`).

The data floor runs without Ray (`mg_ray.data.prepare` defaults to a local process pool); this
module, a floor above, is where Ray comes in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mg_ray.cluster import cluster_address, init_ray
from mg_ray.data import video_io
from mg_ray.data.annotations import AnnotationError, safe_load_pickle
from mg_ray.data.prepare import (
    FRAMES,
    STORES,
    ClipJob,
    ClipResult,
    PrepareError,
    prepare,
    prepare_clip,
)


def ray_map(fn: Callable[[Any], Any], jobs: list[Any], workers: int | None) -> Iterator[Any]:
    """`fn` of each job on Ray Data over the connected cluster, one CPU a job, results as they
    finish (in any order); jobs and results travel as Python objects. Starts a private local
    cluster of `workers` CPUs when none is connected, and stops it at the end."""
    import ray  # heavy: only these commands' per-clip work needs it

    started = not ray.is_initialized()
    init_ray(num_cpus=None if cluster_address() else workers)
    try:
        if not jobs:
            return
        # a few blocks per CPU: enough to spread over every core and balance long jobs, few
        # enough that Ray Data's cost per task stays small beside a job's
        cpus = int(ray.cluster_resources().get("CPU", 1))
        blocks = max(1, min(len(jobs), 4 * cpus))
        results = ray.data.from_items([{"job": job} for job in jobs], override_num_blocks=blocks)
        results = results.map(lambda row: {"result": fn(row["job"])}, num_cpus=1)
        for row in results.iter_rows():
            yield row["result"]
    finally:
        if started:
            ray.shutdown()


def on_ray(jobs: list[ClipJob], workers: int | None) -> Iterator[ClipResult]:
    """`prepare`'s runner on Ray Data (`ray_map` of `prepare_clip`)."""
    return ray_map(prepare_clip, jobs, workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="source dataset folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="new dataset folder")
    parser.add_argument(
        "--short-side", type=int, default=256, help="target short side in pixels (never upscales)"
    )
    parser.add_argument("--gop", type=int, default=8, help="keyframe interval in frames")
    parser.add_argument(
        "--crf", type=int, default=20, help="x264 quality (lower is better, larger)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="CPUs of the private local Ray cluster (ignored with RAY_ADDRESS: the cluster's)",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="video",
        help="how frames are kept: H.264 clips, or a frame store of JPEGs or uint8 arrays",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of --store jpeg")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing mg-ray dataset at --out"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = prepare(
            args.src,
            args.out,
            args.short_side,
            args.gop,
            args.crf,
            args.workers,
            args.force,
            store=args.store,
            quality=args.quality,
            run_jobs=on_ray,
        )
    except (
        PrepareError,
        AnnotationError,
        ValueError,
        FileNotFoundError,
        video_io.DatasetWriteError,
    ) as err:
        print(f"mg-ray prepare: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    meta = json.loads((out / video_io.METADATA).read_text())
    clips = len(safe_load_pickle(out / video_io.ANNOTATIONS)["annotations"])
    folder = out / (video_io.VIDEOS if args.store == "video" else FRAMES)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    how = f"keyframe every {args.gop} frames" if args.store == "video" else f"{args.store} frames"
    print(f"prepared dataset written to {out}")
    print(
        f"  {clips} clips, short side <= {args.short_side}, {how}, {size / 2**20:.1f} MiB, "
        f"fingerprint {meta['fingerprint'][:16]}, {seconds:.1f} s ({clips / seconds:.1f} clips/s)"
    )
    return 0
