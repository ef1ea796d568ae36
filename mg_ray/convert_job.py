"""`mg-ray convert-imigue`: `mg_ray.data.imigue.convert` with the long videos cut on Ray Data.

    mg-ray convert-imigue --src RAW --out DIR --split-file SPLIT.csv [--videos LONG] [--workers N]

Each long video is one job of `mg_ray.prepare_job.ray_map` (one CPU each, over the connected
cluster, else a private local one of `--workers` CPUs): its gestures are cut in one decode
(`imigue.cut_job`), the result is journaled as it arrives, an interrupted run resumes with the
videos not yet cut, and a video that cannot be read has its gestures left out and named.
Without `--videos` nothing needs Ray and none is started.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

from mg_ray.data import imigue
from mg_ray.prepare_job import ray_map


def cuts_on_ray(jobs: list[imigue.CutJob], workers: int | None) -> Iterator[imigue.CutResult]:
    return ray_map(imigue.cut_job, jobs, workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    imigue.add_arguments(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="with --videos: CPUs of the private local Ray cluster (ignored with RAY_ADDRESS)",
    )


def run(args: argparse.Namespace) -> int:
    return imigue.run(args, run_cuts=cuts_on_ray if args.videos else None)
