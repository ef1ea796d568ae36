"""`mg-ray predict`: classify clips with a registered (or any MLflow) model.

    mg-ray predict --model models:/mg-ray-fused@champion clip1.mp4 clip2.mp4
    mg-ray predict --model models:/<logged model id> clip.mp4 --skeleton clip.npz
    mg-ray predict --model models:/mg-ray-fused@champion --data ~/.mg-ray/datasets/synth s09_c00_0003
    mg-ray predict --model models:/mg-ray-fused@champion --data DIR --split test --submission OUT.zip

Each clip needs its skeleton: `--skeleton` files in clip order, or a file next to the clip with
the same stem and `.npz` / `.json` suffix (format: `mg_ray.data.load_skeleton`). With `--data`,
the clips are entries of a dataset folder (their `frame_dir`, or their video path) and the
skeletons come from its annotation file; the true label is printed beside the prediction.
Prints the top-5 classes with names and probabilities.

`--split NAME` predicts every clip of a split (labeled or not) on Ray Data over the connected
cluster (RAY_ADDRESS, else a private local one): `batch_classify`, `--actors` model-holding
actors, `--serial` for one process without Ray. `--submission OUT.zip` writes the MiGA
submission: `Submission.csv` (one `clip_name,class_id` line per clip, no header) zipped as
OUT.zip, and beside it OUT.top5.csv with each clip's five best classes and probabilities.

`--request BODY.json` classifies nothing: it writes the clips as the JSON body a served model
takes (`request_body`), for `curl -d @BODY.json http://127.0.0.1:5001/invocations`.

The model is an MLflow pyfunc model (`mg_ray.serving`), so `mlflow.pyfunc.load_model` of the
same URI works too, and every path here goes through its `predict`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from mg_ray.data import load_index, load_skeleton
from mg_ray.data.annotations import UNLABELED
from mg_ray.serving.clips import ClipRequestError
from mg_ray.tracking.models import load_pyfunc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="models:/<name>@<alias>, models:/<name>/<version> or models:/<logged model id> "
        "(needed unless --request)",
    )
    parser.add_argument(
        "clips", nargs="*", type=Path, help="video files (.mp4), or clip names with --data"
    )
    parser.add_argument(
        "--data", type=Path, help="a dataset folder holding the clips and their skeletons"
    )
    parser.add_argument(
        "--split", help="with --data: every clip of this split (instead of naming clips)"
    )
    parser.add_argument(
        "--submission", type=Path, help="write the MiGA submission zip here (must not exist)"
    )
    parser.add_argument(
        "--request",
        type=Path,
        help="write the clips as the JSON body of a request to `mlflow models serve` here "
        "(must not exist) instead of classifying them",
    )
    parser.add_argument(
        "--skeleton",
        action="append",
        type=Path,
        default=[],
        help="skeleton file per clip, in order (default: <clip stem>.npz/.json beside it)",
    )
    parser.add_argument(
        "--actors",
        type=int,
        help="with --split: model-holding Ray Data actors (default: one per GPU of the "
        "cluster, else one per CPU)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="with --split: classify in this process, one clip after another, without Ray",
    )
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument(
        "--clips-per-video", type=int, help="test clips averaged per video (default: the model's)"
    )
    parser.add_argument(
        "--tracking-uri", help="default: MLFLOW_TRACKING_URI or the local sqlite store"
    )


def find_skeleton(clip: Path) -> Path:
    for suffix in (".npz", ".json"):
        candidate = clip.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{clip}: no skeleton given and none beside it ({clip.with_suffix('.npz').name} or .json)"
    )


def load_classifier(model_uri: str, tracking_uri: str | None = None):
    """(pyfunc model, the wrapped MicroGestureClassifier with class names and data settings)."""
    return load_pyfunc(model_uri, tracking_uri)


def classify(
    model, inner, clips: list[tuple[Path, Any]], num_clips: int | None = None
) -> np.ndarray:
    """Fused probabilities [len(clips), K] for (video, skeleton) pairs, through the pyfunc's own
    clip input (`mg_ray.serving`), `num_clips` test clips averaged per video (default: the
    model's `test_clips`). A skeleton is a file for `load_skeleton` or an already loaded
    (keypoint, score, img_shape) tuple. A clip that cannot be read is a `ClipRequestError`."""
    rows = [
        {
            "video": str(video),
            "skeleton": (
                dict(zip(("keypoint", "keypoint_score", "img_shape"), skeleton))
                if isinstance(skeleton, tuple)
                else str(skeleton)
            ),
            "clip": str(video),
        }
        for video, skeleton in clips
    ]
    try:
        out = model.predict(
            pd.DataFrame(rows, columns=["video", "skeleton", "clip"]),
            params={"num_clips": num_clips} if num_clips else None,
        )
    except MlflowException as err:  # the pyfunc's one-line error about a clip
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise ClipRequestError(err.message) from None
    return np.array(out["probabilities"].tolist(), dtype=np.float32).reshape(len(rows), -1)


class ClipClassifier:
    """A Ray Data actor of `batch_classify`: loads the model and the dataset's index once, then
    classifies batches of the dataset's clips (`frame_dir`, `position`) with `classify`, the
    one-process path's own function. Ray gives it a GPU when the cluster has them, and the
    pyfunc then runs the network there."""

    def __init__(self, model_uri: str, tracking_uri: str | None, root: str, num_clips: int | None):
        self.model, _ = load_classifier(model_uri, tracking_uri)
        self.index = load_index(Path(root))
        self.entries = {a.frame_dir: a for part in self.index.splits.values() for a in part}
        self.num_clips = num_clips

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips = []
        for name in batch["frame_dir"]:
            a = self.entries[str(name)]
            clips.append(
                (self.index.video_path(a.frame_dir), (a.keypoint, a.keypoint_score, a.img_shape))
            )
        probs = classify(self.model, None, clips, self.num_clips)
        return {"position": batch["position"], "probabilities": probs}


def batch_classify(
    model_uri: str,
    tracking_uri: str | None,
    root: Path,
    names: list[str],
    num_clips: int | None = None,
    actors: int | None = None,
    batch_size: int = 4,
) -> np.ndarray:
    """`classify` of a dataset's clips (`frame_dir`s) on Ray Data over the connected cluster (a
    private local one without RAY_ADDRESS): `actors` model-holding actors (default: one per GPU
    of the cluster, else one per CPU), each reading and classifying its clips, with Ray Data's
    progress bar; returns the probabilities [len(names), K] in the order of `names`, equal to
    `classify`'s."""
    import ray  # heavy: only the batch path needs Ray

    from mg_ray.cluster import init_ray

    init_ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if actors is None:
        actors = gpus or max(1, int(resources.get("CPU", 1)))
    actors = max(1, min(actors, len(names)))
    items = [{"position": i, "frame_dir": name} for i, name in enumerate(names)]
    blocks = max(1, min(len(items), actors * 4))  # enough blocks that every actor has work
    predicted = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ClipClassifier,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "tracking_uri": tracking_uri,
            "root": str(root),
            "num_clips": num_clips,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0 if gpus else 1,
        num_gpus=1 if gpus else 0,
    )
    probs: dict[int, np.ndarray] = {}
    for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
        probs.update(zip(batch["position"].tolist(), batch["probabilities"]))
    return np.stack([probs[i] for i in range(len(names))])


def request_body(clips: list[tuple[Path, Any]]) -> dict[str, Any]:
    """The JSON body of a `mlflow models serve` request classifying (video, skeleton) pairs: a
    `dataframe_split` table with each clip's video file and skeleton (a JSON skeleton file) as
    base64 bytes, the encoding MLflow's scoring server decodes for a binary column, and its name."""
    data = []
    for video, skeleton in clips:
        if isinstance(skeleton, tuple):
            keypoint, score, img_shape = skeleton
        else:
            keypoint, score, img_shape = load_skeleton(skeleton)
        fields = {"keypoint": keypoint.tolist(), "keypoint_score": score.tolist()}
        if img_shape is not None:
            fields["img_shape"] = [int(x) for x in img_shape]
        encoded = json.dumps(fields, separators=(",", ":")).encode()
        if not Path(video).is_file():
            raise SystemExit(
                f"error: {video}: not a video file (a frame store's clip?); a request carries "
                "the video file's bytes: make it from the dataset with videos"
            )
        data.append(
            [
                base64.b64encode(Path(video).read_bytes()).decode(),
                base64.b64encode(encoded).decode(),
                Path(video).stem,
            ]
        )
    return {"dataframe_split": {"columns": ["video", "skeleton", "clip"], "data": data}}


def dataset_clips(
    root: Path, names: list[Path], split: str | None = None
) -> list[tuple[Path, tuple, str | None]]:
    """(video path, (keypoint, score, img_shape), true class name or None) for named clips of a
    dataset, or for every clip of `split`."""
    index, chosen = dataset_entries(root, names, split)
    return [
        (
            index.video_path(a.frame_dir),
            (a.keypoint, a.keypoint_score, a.img_shape),
            None if a.label == UNLABELED else index.class_names[a.label],
        )
        for a in chosen
    ]


def dataset_entries(root: Path, names: list[Path], split: str | None = None):
    """(the dataset's index, its annotations of the named clips or of every clip of `split`)."""
    index = load_index(root)
    if split is not None:
        chosen = index.split(split)
    else:
        entries = {a.frame_dir: a for part in index.splits.values() for a in part}
        chosen = []
        for name in names:
            key = name.stem if name.suffix == index.video_ext else str(name)
            if key not in entries:
                raise FileNotFoundError(
                    f"{name}: no clip of that name in {root} ({len(entries)} clips, e.g. "
                    f"{next(iter(entries))})"
                )
            chosen.append(entries[key])
    return index, chosen


def top5_path(submission: Path) -> Path:
    """The top-5 CSV written beside a submission zip."""
    return submission.with_name(f"{submission.stem}.top5.csv")


def check_submission_target(submission: Path) -> None:
    """Refuse (SystemExit) a submission path that exists, whose top-5 CSV exists, or whose folder
    does not: checked before any model is loaded, nothing is overwritten."""
    if submission.exists() or top5_path(submission).exists():
        raise SystemExit(
            f"error: --submission {submission}: it (or its .top5.csv) exists; nothing is overwritten"
        )
    if not submission.parent.is_dir():
        raise SystemExit(
            f"error: --submission {submission}: folder {submission.parent} does not exist"
        )


def write_submission(
    path: Path, names: list[str], probs: np.ndarray, class_names: list[str]
) -> Path:
    """The MiGA submission: `Submission.csv` (`clip_name,class_id`, no header) zipped at `path`,
    and `<path stem>.top5.csv` beside it (clip, then five class_id,name,probability triples).
    Returns the top-5 file's path."""
    top5 = top5_path(path)
    lines = "".join(f"{name},{int(p.argmax())}\n" for name, p in zip(names, probs))
    with zipfile.ZipFile(path, "x", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Submission.csv", lines)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["clip_name"]
        + [f"{kind}{i}" for i in range(1, 6) for kind in ("class_id_", "class_", "prob_")]
    )
    for name, p in zip(names, probs):
        best = np.argsort(-p)[:5]
        writer.writerow([name] + [v for k in best for v in (int(k), class_names[k], f"{p[k]:.6f}")])
    top5.write_text(buffer.getvalue())
    return top5


def run(args: argparse.Namespace) -> int:
    if args.split and not args.data:
        raise SystemExit("error: --split needs --data (the dataset folder the split belongs to)")
    if not args.clips and not args.split:
        raise SystemExit("error: name clips, or give --data DIR --split NAME")
    if args.submission is not None:
        check_submission_target(args.submission)
    if args.request is None and not args.model:
        raise SystemExit("error: --model is needed (the model that classifies the clips)")
    if args.request is not None and args.request.exists():
        raise SystemExit(f"error: --request {args.request}: it exists; nothing is overwritten")
    if args.request is None:
        model, inner = load_classifier(args.model, args.tracking_uri)  # a missing model fails first
    if args.data:
        clips = dataset_clips(args.data, list(args.clips), args.split)
    else:
        if args.skeleton and len(args.skeleton) != len(args.clips):
            raise SystemExit(
                f"error: {len(args.skeleton)} --skeleton files for {len(args.clips)} clips; give one per clip or none"
            )
        for clip in args.clips:
            if not clip.is_file():
                raise SystemExit(f"error: {clip}: video not found")
        skeleton_files = args.skeleton or [find_skeleton(c) for c in args.clips]
        clips = [(c, s, None) for c, s in zip(args.clips, skeleton_files)]
    if args.request is not None:
        body = request_body([(c, s) for c, s, _ in clips])
        args.request.write_text(json.dumps(body))
        print(f"{args.request}: a request classifying {len(clips)} clip(s)")
        return 0
    if args.split and not args.serial:  # a whole split: on Ray Data over the cluster
        names = [a.frame_dir for a in dataset_entries(args.data, [], args.split)[1]]
        probs = batch_classify(
            args.model, args.tracking_uri, args.data, names, args.clips_per_video, args.actors
        )
    else:
        probs = classify(model, inner, [(c, s) for c, s, _ in clips], args.clips_per_video)
    if args.submission is not None:
        names = [Path(c).stem for c, _, _ in clips]
        top5 = write_submission(args.submission, names, probs, inner.class_names)
        print(f"{args.submission}: Submission.csv with {len(names)} clips; top-5 classes in {top5}")
        return 0
    for (clip, _, truth), p in zip(clips, probs):
        print(f"{clip}:" + (f"  (true class: {truth})" if truth else ""))
        for k in np.argsort(-p)[: args.top]:
            print(f"  {p[k]:.3f}  {k:>3}  {inner.class_names[k]}")
    return 0
