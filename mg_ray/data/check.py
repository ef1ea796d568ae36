"""The dataset check every job runs on its driver before Ray starts, and `mg-ray check-data DIR`.

The embedded default (the synthetic dataset under $MG_RAY_HOME) is generated on first use; any
other folder must exist and load cleanly (annotations validated, the configured splits present),
so a wrong path or split name fails in a second, not inside the workers.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mg_ray import paths
from mg_ray.data.annotations import UNLABELED, AnnotationError, DatasetIndex, index_for, load_index
from mg_ray.data.config import DataConfig
from mg_ray.data.synth import generate


def generate_once(root: Path, make: Callable[[Path], object]) -> None:
    """`make(root)` unless `root` exists, one process at a time: two drivers started together
    in a fresh home would both generate, and the second would then refuse to replace the first's
    dataset. The second waits on a lock file beside `root` and finds the dataset there."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with paths.exclusive(root.parent / f".{root.name}.generating"):
        if not root.exists():
            print(f"synthetic dataset not found; generating it in {root}")
            make(root)


def ensure_dataset(
    cfg: DataConfig, *, rgb: bool = True, index: DatasetIndex | None = None
) -> DatasetIndex:
    """Generate the default synthetic dataset if it is missing; check that `cfg`'s dataset loads,
    has the splits it names, labeled for training and validation (the test split too, unless it is
    null), and, when the model reads RGB (`rgb`), a video folder. Returns the loaded index (a
    study shares it with every trial); `index`: one loaded before for the same
    `cfg.index_source()`, checked again for `cfg`'s splits. Raises FileNotFoundError or
    AnnotationError naming the problem."""
    root = Path(cfg.root).expanduser()
    if not root.is_absolute():
        raise FileNotFoundError(
            f"data.root: {cfg.root} is a relative path; give an absolute one (Ray's workers run in "
            f"other folders, and `ray job submit` runs the job in a temporary copy of the project)"
        )
    if not root.exists() and root.resolve() == paths.synthetic_dataset().resolve():
        generate_once(root, generate)
    if not root.exists():
        raise FileNotFoundError(f"data.root: dataset folder {root} does not exist")
    index = index if index is not None else index_for(cfg)
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None and split not in index.splits:
            raise AnnotationError(
                f"{root}: data.{key}: no split {split!r} "
                f"(the annotations have {', '.join(sorted(index.splits))})"
            )
        if split is not None:
            try:
                index.labeled(split)
            except AnnotationError as err:
                hint = (
                    " (set data.test_split: null to train without a test evaluation)"
                    if key == "test_split"
                    else ""
                )
                raise AnnotationError(f"data.{key}: {err}{hint}") from None
    if rgb and not index.video_root.is_dir():
        raise AnnotationError(
            f"{index.video_root}: no video folder: this dataset is skeleton-only, which "
            f"pose-only models (model.modality: pose) can train on; an RGB or two-stream "
            f"model needs the clips"
        )
    return index


def report(root: Path) -> tuple[list[str], list[str]]:
    """(summary lines, problems) for the dataset folder `root`, reading no video but checking
    that each clip's file exists. No problems: the folder is usable."""
    root = Path(root).expanduser()
    try:
        index = load_index(root)
    except (AnnotationError, FileNotFoundError) as err:
        return [f"{root}: not loadable"], [str(err)]
    problems: list[str] = []
    lines = [
        f"{root}",
        f"  layout: {index.layout.name} ({index.layout.num_joints} joints)",
        f"  classes: {index.num_classes}",
    ]
    clips = [a for split in index.splits.values() for a in split]
    unique = {a.frame_dir: a for a in clips}
    counts = Counter(a.label for a in unique.values())
    lines.append(
        "  clips per class: "
        + ", ".join(
            f"{k} {index.class_names[k]}: {counts.get(k, 0)}" for k in range(index.num_classes)
        )
    )
    if counts.get(UNLABELED):
        lines.append(f"  unlabeled clips: {counts[UNLABELED]} (predictable, not trainable)")
    for name, split in index.splits.items():
        unlabeled = sum(a.label == UNLABELED for a in split)
        lines.append(
            f"  split {name}: {len(split)} clips"
            + (f", {unlabeled} unlabeled" if unlabeled else "")
        )
    frames = np.array([a.total_frames for a in unique.values()] or [0])
    persons = Counter(int(a.keypoint.shape[0]) for a in unique.values())
    lines.append(
        f"  frames per clip: min {frames.min()}, median {int(np.median(frames))}, max {frames.max()}"
    )
    lines.append(
        "  persons per clip: " + ", ".join(f"{m}: {n} clips" for m, n in sorted(persons.items()))
    )
    empty = [a.frame_dir for a in unique.values() if not (a.keypoint_score > 0).any()]
    if empty:
        problems.append(
            f"{len(empty)} clip(s) have no detected joint at all, e.g. clip {empty[0]!r}"
        )
    if not index.video_root.is_dir():
        lines.append(
            f"  videos: none ({index.video_root} absent): skeleton-only, for pose-only models"
        )
    else:
        missing = [
            a.frame_dir for a in unique.values() if not index.video_path(a.frame_dir).is_file()
        ]
        lines.append(f"  videos: {len(unique) - len(missing)} of {len(unique)} clips")
        if missing:
            problems.append(
                f"{len(missing)} clip(s) have no video: e.g. {index.video_path(missing[0])} not found"
            )
    return lines, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="the dataset folder")


def run(args: argparse.Namespace) -> int:
    lines, problems = report(args.root)
    print("\n".join(lines))
    for problem in problems:
        print(f"  problem: {problem}")
    print("  usable" if not problems else f"  not usable: {len(problems)} problem(s)")
    return 0 if not problems else 2
