"""`mg-ray predict`: classify clips with a registered (or any MLflow) model.

    mg-ray predict --model models:/mg-ray-fused@champion clip1.mp4 clip2.mp4
    mg-ray predict --model runs:/<run id>/model clip.mp4 --skeleton clip.npz

Each clip needs its skeleton: `--skeleton` files in clip order, or a file next to the clip with
the same stem and `.npz` / `.json` suffix (format: `mg_ray.data.load_skeleton`). Prints the top-5
classes with names and probabilities. The model is an MLflow pyfunc model (see
`mg_ray.tune.promote`), so `mlflow.pyfunc.load_model` of the same URI works too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model")
    parser.add_argument("clips", nargs="+", type=Path, help="video files (.mp4)")
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

    from mg_ray.train import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(model_uri)
    return model, model.unwrap_python_model()


def classify(model, inner, clips: list[Path], skeletons: list[Path], num_clips: int | None = None) -> np.ndarray:
    """Fused probabilities [len(clips), K] for clips with their skeletons."""
    from mg_ray.data import clip_inputs, load_skeleton

    data = inner.data
    rows = []
    for clip, skeleton_path in zip(clips, skeletons):
        if not clip.is_file():
            raise FileNotFoundError(f"{clip}: video not found")
        skeleton = load_skeleton(skeleton_path)
        inputs = clip_inputs(
            clip,
            skeleton["keypoint"],
            skeleton["keypoint_score"],
            skeleton.get("img_shape"),
            data=data,
            num_clips=num_clips or data.get("test_clips", 1),
        )
        rows.append(model.predict({"rgb": inputs["rgb"][None].numpy(), "pose": inputs["pose"][None].numpy()}))
    return np.concatenate(rows)


def run(args: argparse.Namespace) -> int:
    if args.skeleton and len(args.skeleton) != len(args.clips):
        raise SystemExit(f"error: {len(args.skeleton)} --skeleton files for {len(args.clips)} clips; give one per clip or none")
    skeletons = args.skeleton or [find_skeleton(c) for c in args.clips]
    model, inner = load_classifier(args.model, args.tracking_uri)
    probs = classify(model, inner, list(args.clips), skeletons, args.clips_per_video)
    for clip, p in zip(args.clips, probs):
        print(f"{clip}:")
        for k in np.argsort(-p)[: args.top]:
            print(f"  {p[k]:.3f}  {k:>3}  {inner.class_names[k]}")
    return 0
