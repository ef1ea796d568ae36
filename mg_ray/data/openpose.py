"""`mg-ray convert-openpose`: build an mg-ray dataset from raw OpenPose output.

Input, as OpenPose writes it with `--write_json` (one folder per clip, one JSON per frame):

    <openpose-dir>/<clip>/<clip>_000000000000_keypoints.json
        {"people": [{"pose_keypoints_2d": [x, y, c, ...],          # BODY_25: 25 x 3, COCO: 18 x 3
                     "hand_left_keypoints_2d": [...],               # 21 x 3 (with --hand)
                     "hand_right_keypoints_2d": [...]}, ...]}
        (OpenPose 1.0 / 1.1 name them pose_keypoints, hand_left_keypoints, hand_right_keypoints;
        both spellings are read, and a person with neither is an error, never a zero skeleton)
    <videos>/<clip>.mp4
    labels CSV with a header: clip,label[,subject,split]   (label: class id or class name)
    classes file: one class name per line, in id order

Output: the mg-ray dataset format (see `mg_ray.data.video_io`) with the `body25`,
`body25_hands` or `coco18` (OpenPose's COCO model) layout (`mg_ray.data.layouts`); face keypoints are dropped. Per frame the people are
ranked by summed confidence and the first `max_people` kept (OpenPose does not track identities;
interview clips show one person). A frame without people, or a person without hands, gives zeros
with score 0, as undetected joints have in OpenPose itself. Videos are symlinked into `videos/`
(or copied with `copy=True`). The split comes from the labels' `split` column or a split file
(CSV `clip,split`).

Every problem in the input is an error naming the file (and line or field): a malformed JSON,
a clip folder or video that is missing, a label that is not a known class.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mg_ray.data import video_io
from mg_ray.data.layouts import BODY25, BODY25_HANDS, COCO18, KeypointLayout

LAYOUTS = {"body25": BODY25, "body25_hands": BODY25_HANDS, "coco18": COCO18}
BODY_JOINTS = {"body25": 25, "body25_hands": 25, "coco18": 18}  # points in the pose_keypoints list
# each part's key from OpenPose 1.2 on, then the 1.0 / 1.1 spelling
BODY_KEYS = ("pose_keypoints_2d", "pose_keypoints")
HAND_KEYS = {
    "left": ("hand_left_keypoints_2d", "hand_left_keypoints"),
    "right": ("hand_right_keypoints_2d", "hand_right_keypoints"),
}
HAND_JOINTS = 21
FRAME_FILE = re.compile(r"_(\d+)_keypoints\.json$")


class ConvertError(ValueError):
    """The OpenPose tree, the label file or the videos cannot be converted; names the file."""


# ---------------------------------------------------------------------------------------------
# Parsing one frame (pure: JSON object in, arrays out)


def _triples(values, joints: int, where: str) -> np.ndarray:
    """[x, y, c, ...] (3 x joints numbers, or empty for "not detected") -> float32 [joints, 3]."""
    if values is None or len(values) == 0:
        return np.zeros((joints, 3), np.float32)
    if not isinstance(values, list) or len(values) != 3 * joints:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ConvertError(
            f"{where}: expected {3 * joints} numbers ({joints} joints x (x, y, c)), got {got}"
        )
    try:
        array = np.asarray(values, dtype=np.float32).reshape(joints, 3)
    except (TypeError, ValueError):
        raise ConvertError(f"{where}: expected numbers") from None
    if not np.isfinite(array).all():
        raise ConvertError(f"{where}: NaN or infinite values")
    return array


def parse_frame(frame: object, layout: KeypointLayout, max_people: int, where: str) -> np.ndarray:
    """One OpenPose frame -> float32 [max_people, V, 3] (x, y, score), best people first."""
    if not isinstance(frame, dict) or not isinstance(frame.get("people"), list):
        raise ConvertError(f"{where}: expected an object with a 'people' list")
    people = []
    for p, person in enumerate(frame["people"]):
        if not isinstance(person, dict):
            raise ConvertError(f"{where}: people[{p}]: expected an object")
        body = next((key for key in BODY_KEYS if key in person), None)
        if body is None:
            raise ConvertError(
                f"{where}: people[{p}]: none of the keys {' / '.join(BODY_KEYS)} (OpenPose 1.2+ / "
                f"1.0-1.1); its keys: {sorted(person)[:6]}"
            )
        parts = [_triples(person[body], BODY_JOINTS[layout.name], f"{where}: people[{p}].{body}")]
        if layout is BODY25_HANDS:
            for side in ("left", "right"):
                key = next((k for k in HAND_KEYS[side] if k in person), HAND_KEYS[side][0])
                parts.append(_triples(person.get(key), HAND_JOINTS, f"{where}: people[{p}].{key}"))
        people.append(np.concatenate(parts))
    people.sort(key=lambda joints: -float(joints[:, 2].sum()))
    out = np.zeros((max_people, layout.num_joints, 3), np.float32)
    for i, joints in enumerate(people[:max_people]):
        out[i] = joints
    out[out[..., 2] <= 0] = 0.0  # undetected: coordinates and score 0
    return out


def read_clip(folder: Path, layout: KeypointLayout, max_people: int) -> tuple[np.ndarray, int]:
    """All frames of one clip folder -> (float32 [M, T, V, 3], number of frames without a file).

    T is the highest frame index + 1; a frame whose JSON is absent is all zeros."""
    files = {}
    for path in folder.glob("*_keypoints.json"):
        match = FRAME_FILE.search(path.name)
        if match:
            files[int(match.group(1))] = path
    if not files:
        raise ConvertError(f"{folder}: no OpenPose frame files (*_<frame>_keypoints.json)")
    frames = max(files) + 1
    clip = np.zeros((max_people, frames, layout.num_joints, 3), np.float32)
    for index, path in files.items():
        try:
            frame = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConvertError(f"{path}: malformed JSON: {err}") from None
        clip[:, index] = parse_frame(frame, layout, max_people, str(path))
    return clip, frames - len(files)


# ---------------------------------------------------------------------------------------------
# Labels, classes, split


@dataclass(frozen=True)
class LabelRow:
    clip: str
    label: int
    subject: str | None
    split: str | None


def read_labels(path: Path, classes: list[str]) -> list[LabelRow]:
    """CSV with a header naming at least `clip` and `label`; label = class id or class name."""
    if not path.is_file():
        raise ConvertError(f"{path}: labels file not found")
    index = {name: i for i, name in enumerate(classes)}
    rows, seen = [], set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "clip" not in header or "label" not in header:
            raise ConvertError(
                f"{path}: header must name the columns clip,label[,subject,split]; got {header}"
            )
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            clip = (row.get("clip") or "").strip()
            raw = (row.get("label") or "").strip()
            if not clip:
                raise ConvertError(f"{path}:{line}: empty clip name")
            if "/" in clip or clip.startswith("."):
                raise ConvertError(f"{path}:{line}: clip {clip!r}: not a plain folder name")
            if clip in seen:
                raise ConvertError(f"{path}:{line}: clip {clip!r} is listed twice")
            if raw in index:
                label = index[raw]
            elif raw.lstrip("-").isdigit() and 0 <= int(raw) < len(classes):
                label = int(raw)
            else:
                raise ConvertError(
                    f"{path}:{line}: clip {clip!r}: unknown label {raw!r}; expected a class id in "
                    f"[0, {len(classes) - 1}] or one of the {len(classes)} class names"
                )
            seen.add(clip)
            subject = (row.get("subject") or "").strip() or None
            split = (row.get("split") or "").strip() or None
            rows.append(LabelRow(clip, label, subject, split))
    if not rows:
        raise ConvertError(f"{path}: no clips listed")
    return rows


def read_split_file(path: Path) -> dict[str, str]:
    """CSV `clip,split` with a header -> {clip: split}."""
    if not path.is_file():
        raise ConvertError(f"{path}: split file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "clip" not in header or "split" not in header:
            raise ConvertError(f"{path}: header must name the columns clip,split; got {header}")
        reader.fieldnames = header
        return {(r["clip"] or "").strip(): (r["split"] or "").strip() for r in reader}


def assign_splits(
    rows: list[LabelRow], split_file: dict[str, str] | None, labels_path: Path
) -> dict[str, list[str]]:
    split: dict[str, list[str]] = {}
    for row in rows:
        name = split_file.get(row.clip) if split_file is not None else row.split
        if not name:
            source = (
                "the split file"
                if split_file is not None
                else f"{labels_path} (no 'split' column value)"
            )
            raise ConvertError(f"clip {row.clip!r}: no split given in {source}")
        split.setdefault(name, []).append(row.clip)
    return split


# ---------------------------------------------------------------------------------------------
# Videos


def probe_video(path: Path) -> tuple[tuple[int, int], int]:
    """((height, width), frame count or 0 when the container does not say)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return (stream.codec_context.height, stream.codec_context.width), int(
                stream.frames or 0
            )
    except (av.FFmpegError, IndexError, OSError) as err:
        raise ConvertError(f"{path}: not a readable video: {err}") from None


# ---------------------------------------------------------------------------------------------
# The conversion


def convert(
    openpose_dir: Path,
    labels: Path,
    videos: Path,
    out: Path,
    classes: Path,
    layout: str = "body25",
    split_file: Path | None = None,
    max_people: int = 1,
    copy: bool = False,
    force: bool = False,
    log=print,
) -> Path:
    """Build the dataset at `out`; returns its path. See the module docstring."""
    if layout not in LAYOUTS:
        raise ConvertError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if max_people < 1:
        raise ConvertError(f"max_people: expected an integer >= 1, got {max_people}")
    kp_layout = LAYOUTS[layout]
    openpose_dir, videos = (
        Path(openpose_dir).expanduser().absolute(),
        Path(videos).expanduser().absolute(),
    )
    if not openpose_dir.is_dir():
        raise ConvertError(f"{openpose_dir}: OpenPose folder not found")
    if not videos.is_dir():
        raise ConvertError(f"{videos}: videos folder not found")
    try:
        class_names = video_io.read_classes(Path(classes))
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError(str(err)) from None
    rows = read_labels(Path(labels), class_names)
    split = assign_splits(
        rows, read_split_file(Path(split_file)) if split_file else None, Path(labels)
    )
    # Check every input exists before the (long) parsing starts.
    for row in rows:
        if not (openpose_dir / row.clip).is_dir():
            raise ConvertError(
                f"clip {row.clip!r}: OpenPose folder not found: {openpose_dir / row.clip}"
            )
        if not (videos / f"{row.clip}.mp4").is_file():
            raise ConvertError(f"clip {row.clip!r}: video not found: {videos / f'{row.clip}.mp4'}")

    annotations, gaps, trimmed, normalised = [], [], [], []
    start = time.perf_counter()
    with video_io.staged_output(Path(out), force) as stage:
        (stage / video_io.VIDEOS).mkdir()
        for n, row in enumerate(rows, 1):
            video = videos / f"{row.clip}.mp4"
            (height, width), video_frames = probe_video(video)
            clip, missing_files = read_clip(openpose_dir / row.clip, kp_layout, max_people)
            if missing_files:
                gaps.append(row.clip)
            detected = clip[..., 2] > 0
            if detected.any() and clip[..., :2][detected].max() <= 1.0:
                normalised.append(row.clip)
            if video_frames and clip.shape[1] > video_frames:
                # Keep `total_frames` within the video so every annotated frame can be decoded.
                trimmed.append(f"{row.clip} ({clip.shape[1]} -> {video_frames})")
                clip = clip[:, :video_frames]
            entry = {
                "frame_dir": row.clip,
                "label": row.label,
                "img_shape": (height, width),
                "original_shape": (height, width),
                "total_frames": int(clip.shape[1]),
                "keypoint": np.ascontiguousarray(clip[..., :2]),
                "keypoint_score": np.ascontiguousarray(clip[..., 2]),
            }
            if row.subject is not None:
                entry["subject"] = row.subject
            annotations.append(entry)
            target = stage / video_io.VIDEOS / f"{row.clip}.mp4"
            if copy:
                shutil.copyfile(video, target)
            else:
                target.symlink_to(video)
            if n % 500 == 0:
                log(f"  {n}/{len(rows)} clips ({time.perf_counter() - start:.0f} s)")
        video_io.write_annotations(stage, split, annotations)
        video_io.write_classes(stage, class_names)
        video_io.write_metadata(
            stage,
            name=Path(out).name,
            layout=layout,
            num_classes=len(class_names),
            converter={
                "module": __name__,
                "openpose_dir": str(openpose_dir),
                "labels": str(Path(labels).absolute()),
                "videos": str(videos),
                "max_people": max_people,
                "videos_copied": copy,
            },
        )
    if gaps:
        log(
            f"  note: {len(gaps)} clip(s) lack some frame files (filled with score 0), e.g. {gaps[0]}"
        )
    if normalised:
        log(
            f"  warning: {len(normalised)} clip(s) have every coordinate in [0, 1], e.g. {normalised[0]}: "
            f"OpenPose wrote them normalised (--keypoint_scale 3 or 4?); mg-ray expects pixels of the video"
        )
    if trimmed:
        log(
            f"  note: {len(trimmed)} clip(s) have more keypoint frames than video frames and were "
            f"cut to the video: {', '.join(trimmed[:5])}"
        )
    return Path(out).expanduser().absolute()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--openpose-dir", type=Path, required=True, help="one folder of frame JSONs per clip"
    )
    parser.add_argument(
        "--labels", type=Path, required=True, help="CSV: clip,label[,subject,split]"
    )
    parser.add_argument(
        "--classes", type=Path, required=True, help="class names, one per line, in id order"
    )
    parser.add_argument("--videos", type=Path, required=True, help="folder with <clip>.mp4")
    parser.add_argument("--out", type=Path, required=True, help="new dataset folder")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="body25")
    parser.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help="CSV: clip,split (else the labels' split column)",
    )
    parser.add_argument(
        "--max-people", type=int, default=1, help="people kept per frame, most confident first"
    )
    parser.add_argument(
        "--copy", action="store_true", help="copy the videos instead of symlinking them"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing mg-ray dataset at --out"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = convert(
            args.openpose_dir,
            args.labels,
            args.videos,
            args.out,
            args.classes,
            args.layout,
            args.split_file,
            args.max_people,
            args.copy,
            args.force,
        )
    except (ConvertError, video_io.DatasetWriteError) as err:
        print(f"mg-ray convert-openpose: error: {err}", file=sys.stderr)
        return 2
    meta = json.loads((out / video_io.METADATA).read_text())
    clips = len(list((out / video_io.VIDEOS).iterdir()))
    print(
        f"dataset written to {out}: {clips} clips, {meta['num_classes']} classes, layout {meta['layout']}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0
