"""`mg-ray prepare` on Ray Data with 1 and 2 CPUs, beside the local process pool.

    python benchmarks/bench_prepare.py [--clips-per-class 2] [--frames 80] [--store video]

Writes a synthetic dataset (3 subjects, 10 classes, 320x240 clips) into a temporary folder and
prepares it (short side 128) with, side by side in one run: Ray Data over a private local
cluster of 1 CPU and of 2 CPUs (`mg_ray.prepare_job.on_ray`, cluster start included: the
command starts one), and the library's process pool of 2 (`mg_ray.data.prepare.in_processes`).
Prints clips/s of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-per-class", type=int, default=2)
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--store", default="video", choices=("video", "jpeg", "uint8"))
    args = parser.parse_args()

    from mg_ray.data import synth
    from mg_ray.data.prepare import in_processes, prepare
    from mg_ray.prepare_job import on_ray

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as folder:
        folder = Path(folder)
        src = synth.generate(
            folder / "src",
            seed=0,
            subjects=3,
            clips_per_class=args.clips_per_class,
            frames=args.frames,
            width=320,
            height=240,
            workers=2,
        )
        clips = 30 * args.clips_per_class
        print(f"{clips} clips of {args.frames} frames at 320x240 -> short side 128, {args.store}")
        for label, runner, workers in (
            ("Ray Data, 1 CPU", on_ray, 1),
            ("Ray Data, 2 CPUs", on_ray, 2),
            ("process pool of 2", in_processes, 2),
        ):
            start = time.perf_counter()
            prepare(
                src,
                folder / label.replace(" ", "_").replace(",", ""),
                short_side=128,
                workers=workers,
                store=args.store,
                run_jobs=runner,
                log=lambda *_: None,
            )
            seconds = time.perf_counter() - start
            print(f"{label:<20} {clips / seconds:6.2f} clips/s ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
