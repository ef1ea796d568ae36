"""`mg-ray predict`: classify clips with a registered (or any MLflow) model.

    mg-ray predict --model models:/mg-ray-fused@champion clip1.mp4 clip2.mp4
    mg-ray predict --model runs:/<run id>/model clip.mp4 --skeleton clip.npz
    mg-ray predict --model models:/mg-ray-fused@champion --data ~/.mg-ray/datasets/synth s09_c00_0003

Each clip needs its skeleton: `--skeleton` files in clip order, or a file next to the clip with
the same stem and `.npz` / `.json` suffix (format: `mg_ray.data.load_skeleton`). With `--data`,
the clips are entries of a dataset folder (their `frame_dir`, or their video path) and the
skeletons come from its annotation file; the true label is printed beside the prediction. Prints the top-5
classes with names and probabilities. The model is an MLflow pyfunc model (see
`mg_ray.tune.promote`), so `mlflow.pyfunc.load_model` of the same URI works too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model")
    parser.add_argument("clips", nargs="+", type=Path, help="video files (.mp4), or clip names with --data")
    parser.add_argument("--data", type=Path, help="a dataset folder holding the clips and their skeletons")
    parser.add_argument("--skeleton", action="append", type=Path, default=[],
                        help="skeleton file per clip, in order (default: <clip stem>.npz/.json beside it)")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--clips-per-video", type=int, help="test clips averaged per video (default: the model's)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or the local sqlite store")


def find_skeleton(clip: Path) -> Path:
    for suffix in (".npz", ".json"):
        candidate = clip.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{clip}: no skeleton given and none beside it ({clip.with_suffix('.npz').name} or .json)")


def load_classifier(model_uri: str, tracking_uri: str | None = None):
    """(pyfunc model, the wrapped MicroGestureClassifier with class names and data settings)."""
    import mlflow

    from mg_ray import tracking
    from mg_ray.registry import check_model_uri

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_store(uri)
    check_model_uri(model_uri, uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    return model, model.unwrap_python_model()


def pipeline_params(data: dict):
    """The test-mode pipeline a model was trained with, from the data settings in its model file."""
    from mg_ray.data import PipelineParams
    from mg_ray.data.layouts import get_layout

    limbs = list(get_layout(data["layout"]).limbs) if data.get("heatmap") == "limbs" else None
    return PipelineParams(
        rgb_frames=data["rgb_frames"], pose_frames=data["pose_frames"], rgb_size=data["rgb_size"],
        heatmap_size=data["heatmap_size"], sigma=data["sigma"], limbs=limbs, flip_permutation=None,
    )


def classify(model, inner, clips: list[tuple[Path, Any]], num_clips: int | None = None) -> np.ndarray:
    """Fused probabilities [len(clips), K] for (video, skeleton) pairs, `num_clips` test clips
    averaged per video (default: the model's `test_clips`). A skeleton is a file for
    `load_skeleton` or an already loaded (keypoint, score, img_shape) tuple."""
    from mg_ray.data import clip_inputs, load_skeleton

    params = pipeline_params(inner.data)
    num_clips = num_clips or inner.data.get("test_clips", 1)
    rows = []
    for video, skeleton in clips:
        keypoint, score, img_shape = skeleton if isinstance(skeleton, tuple) else load_skeleton(skeleton)
        inputs = clip_inputs(video, keypoint, score, img_shape, params, mode="test", num_clips=num_clips)
        # the video's `num_clips` views as a batch; the video's prediction is their mean
        probs = model.predict({"rgb": inputs.rgb.numpy(), "pose": inputs.pose.numpy()})
        rows.append(probs.mean(axis=0, keepdims=True))
    return np.concatenate(rows)


def dataset_clips(root: Path, names: list[Path]) -> list[tuple[Path, tuple, str]]:
    """(video path, (keypoint, score, img_shape), true class name) for named clips of a dataset."""
    from mg_ray.data import load_index

    index = load_index(root)
    entries = {a.frame_dir: a for split in index.splits.values() for a in split}
    found = []
    for name in names:
        key = name.stem if name.suffix == index.video_ext else str(name)
        if key not in entries:
            raise FileNotFoundError(f"{name}: no clip of that name in {root} ({len(entries)} clips, e.g. {next(iter(entries))})")
        a = entries[key]
        found.append((index.video_path(key), (a.keypoint, a.keypoint_score, a.img_shape), index.class_names[a.label]))
    return found


def run(args: argparse.Namespace) -> int:
    model, inner = load_classifier(args.model, args.tracking_uri)  # a missing model fails first
    if args.data:
        clips = dataset_clips(args.data, list(args.clips))
    else:
        if args.skeleton and len(args.skeleton) != len(args.clips):
            raise SystemExit(f"error: {len(args.skeleton)} --skeleton files for {len(args.clips)} clips; give one per clip or none")
        for clip in args.clips:
            if not clip.is_file():
                raise SystemExit(f"error: {clip}: video not found")
        skeleton_files = args.skeleton or [find_skeleton(c) for c in args.clips]
        clips = [(c, s, None) for c, s in zip(args.clips, skeleton_files)]
    probs = classify(model, inner, [(c, s) for c, s, _ in clips], args.clips_per_video)
    for (clip, _, truth), p in zip(clips, probs):
        print(f"{clip}:" + (f"  (true class: {truth})" if truth else ""))
        for k in np.argsort(-p)[: args.top]:
            print(f"  {p[k]:.3f}  {k:>3}  {inner.class_names[k]}")
    return 0
