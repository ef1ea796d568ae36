"""The dataset check every job runs on its driver before Ray starts.

The embedded default (the synthetic dataset under $MG_RAY_HOME) is generated on first use; any
other folder must exist and load cleanly (annotations validated, the configured splits present),
so a wrong path or split name fails in a second, not inside the workers.
"""

from __future__ import annotations

from pathlib import Path

from mg_ray import paths
from mg_ray.data.config import DataConfig


def ensure_dataset(cfg: DataConfig) -> None:
    """Generate the default synthetic dataset if it is missing; check that `cfg`'s dataset loads
    and has the splits it names. Raises FileNotFoundError or AnnotationError naming the problem."""
    from mg_ray.data.annotations import AnnotationError, load_index

    root = Path(cfg.root).expanduser()
    if not root.is_absolute():
        raise FileNotFoundError(
            f"data.root: {cfg.root} is a relative path; give an absolute one (Ray's workers run in "
            f"other folders, and `ray job submit` runs the job in a temporary copy of the project)")
    if not root.exists() and root.resolve() == paths.synthetic_dataset().resolve():
        from mg_ray.data.synth import generate

        print(f"synthetic dataset not found; generating it in {root}")
        generate(root)
    if not root.exists():
        raise FileNotFoundError(f"data.root: dataset folder {root} does not exist")
    index = load_index(root, layout=cfg.layout, annotation_file=cfg.annotation_file,
                       video_dir=cfg.video_dir, video_ext=cfg.video_ext)
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg, key)
        if split is not None and split not in index.splits:
            raise AnnotationError(f"{root / cfg.annotation_file}: data.{key}: no split {split!r} "
                                  f"(the file has {', '.join(sorted(index.splits))})")
