"""`mg-ray convert-imigue`: the organisers' raw iMiGUE release as an mg-ray dataset.

Input (docs/data.md, as the organisers' ST-GCN baseline reads it):

    <src>/<id>/<id>_light_hand.csv   no header; one row per frame of the long interview video:
                                     a frame column, then 35 joints x (x, y, confidence)
    <src>/<id>/<id>_label.csv        no header; rows gestureID,start,end (frames of the long video)
    <videos>/<id>.mp4                optional: the long RGB video
    split file                       CSV video_id,split[,subject] (a header row is allowed)

Output: one clip per labelled gesture, named `<id>_<k>` (k = the gesture's row in the label file,
from 0: the name every later release and the MiGA submission use), with the skeleton rows
start..end (both included; the rows are 0-based frame numbers, which the organisers' reader turns
1-based by adding 1 to both) and, with `--videos`, the same frames cut from the long video with
PyAV. Labels follow the organisers' rule: 99 (non-MG) becomes 32, then every id minus 1, so the
classes are 0..31 (`resources/imigue_classes.txt` holds their names, `--classes` another list).
Joints: the 22 the organisers' ST-GCN and the MiGA pickles use (layout `imigue22`), or all 35
(`--layout imigue35`). Without `--videos` the dataset is skeleton-only: pose-only models train on
it, RGB ones refuse it before they start.

Every problem is an error naming the file and line before anything is written; the output goes to
a staged folder moved into place at the end, and an existing folder is replaced only with
`--force` (and only if it is an mg-ray dataset).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mg_ray.data import video_io
from mg_ray.data.layouts import IMIGUE22_FROM_35, LAYOUTS

JOINTS = 35
COLUMNS = 1 + 3 * JOINTS  # the frame column, then x, y, confidence per joint
NON_MG_RAW, NON_MG = 99, 32  # the organisers' mapping of the non-MG id, before the minus 1
IMG_SHAPE = (1080, 1920)  # the release's frame size (the MiGA pickles' img_shape)


class ImigueError(ValueError):
    """The raw release, the split file or a video cannot be converted; names the file and line."""


@dataclass(frozen=True)
class Gesture:
    video: str
    index: int
    label: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.video}_{self.index}"


def read_skeleton_csv(path: Path) -> np.ndarray:
    """`<id>_light_hand.csv` -> float32 [frames, 35, 3] (x, y, confidence)."""
    rows = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != COLUMNS:
                raise ImigueError(
                    f"{path}:{line}: expected {COLUMNS} values (a frame column, then {JOINTS} joints x "
                    f"(x, y, confidence)), got {len(row)}"
                )
            try:
                rows.append([float(v) for v in row[1:]])
            except ValueError:
                raise ImigueError(f"{path}:{line}: expected numbers") from None
    if not rows:
        raise ImigueError(f"{path}: no frames")
    values = np.asarray(rows, np.float32).reshape(len(rows), JOINTS, 3)
    if not np.isfinite(values).all():
        line = int(np.argwhere(~np.isfinite(values))[0][0]) + 1
        raise ImigueError(f"{path}:{line}: NaN or infinite values")
    return values


def read_label_csv(path: Path, video: str, frames: int) -> list[Gesture]:
    """`<id>_label.csv` -> the video's gestures, labels mapped to 0..31."""
    gestures = []
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            try:
                raw, start, end = (int(float(v)) for v in row[:3])
            except ValueError:
                raise ImigueError(
                    f"{path}:{line}: expected gestureID,start,end integers, got {row}"
                ) from None
            label = (NON_MG if raw == NON_MG_RAW else raw) - 1
            if not 0 <= label < NON_MG:
                raise ImigueError(f"{path}:{line}: gestureID {raw}: expected 1..31 or 99")
            if not 0 <= start <= end < frames:
                raise ImigueError(
                    f"{path}:{line}: frames {start}..{end}: expected 0 <= start <= end < {frames} "
                    f"(the skeleton file's frame count)"
                )
            gestures.append(Gesture(video, len(gestures), label, start, end))
    if not gestures:
        raise ImigueError(f"{path}: no gestures")
    return gestures


def read_split_file(path: Path) -> dict[str, tuple[str, str]]:
    """video id -> (split, subject); the subject defaults to the video id."""
    if not path.is_file():
        raise ImigueError(f"{path}: split file not found")
    out: dict[str, tuple[str, str]] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            row = [v.strip() for v in row]
            if (
                not row
                or not row[0]
                or (line == 1 and row[0].lower() in ("video", "video_id", "id"))
            ):
                continue
            if len(row) < 2 or not row[1]:
                raise ImigueError(f"{path}:{line}: expected video_id,split[,subject], got {row}")
            if row[0] in out:
                raise ImigueError(f"{path}:{line}: video {row[0]!r} listed twice")
            out[row[0]] = (row[1], row[2] if len(row) > 2 and row[2] else row[0])
    return out


def default_classes() -> list[str]:
    text = resources.files("mg_ray.data").joinpath("resources/imigue_classes.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def cut_video(source: Path, gestures: list[Gesture], folder: Path) -> tuple[int, int]:
    """Write each gesture's frames of the long video `source` as `<folder>/<name>.mp4`, decoding it
    once; returns the video's (height, width)."""
    import av

    try:
        container = av.open(str(source))
    except av.FFmpegError as err:
        raise ImigueError(f"{source}: not a readable video ({err})") from None
    writers: dict[str, video_io.H264Writer] = {}
    last = max(g.end for g in gestures)
    size = None
    try:
        stream = container.streams.video[0]
        fps = round(float(stream.average_rate or 25))
        for index, frame in enumerate(container.decode(stream)):
            if index > last:
                break
            image = frame.to_ndarray(format="rgb24")
            h, w = image.shape[:2]
            size = (h, w)
            image = image[: h - h % 2, : w - w % 2]
            for g in gestures:
                if g.start <= index <= g.end:
                    if g.name not in writers:
                        writers[g.name] = video_io.H264Writer(
                            folder / f"{g.name}.mp4", image.shape[1], image.shape[0], fps=fps
                        )
                    writers[g.name].write(image)
                elif index > g.end and g.name in writers:
                    writers.pop(g.name).close()
    finally:
        for writer in writers.values():
            writer.close()
        container.close()
    short = [g.name for g in gestures if not (folder / f"{g.name}.mp4").is_file()]
    if short or size is None:
        raise ImigueError(
            f"{source}: the video ends before gesture(s) {short[:3]} (frames beyond its length)"
        )
    return size


@dataclass(frozen=True)
class CutJob:
    """Cut one long video's gestures into `folder` (`cut_video`)."""

    video_id: str
    source: Path
    gestures: tuple[Gesture, ...]
    folder: Path


@dataclass(frozen=True)
class CutResult:
    video_id: str
    img_shape: tuple[int, int] | None = None
    error: str | None = None


def cut_job(job: CutJob) -> CutResult:
    """`cut_video` into a scratch folder whose clips are moved into `job.folder` once all are
    written (a resumed run redoes a video whose result was not journaled); a video that cannot
    be read is returned as its error, not raised: the other videos go on."""
    scratch = job.folder / f".cut-{job.video_id}"
    if scratch.exists():
        shutil.rmtree(scratch)  # an earlier, interrupted attempt
    scratch.mkdir(parents=True)
    import av

    try:
        size = cut_video(job.source, list(job.gestures), scratch)
    except (ImigueError, av.FFmpegError, OSError, ValueError) as err:
        shutil.rmtree(scratch, ignore_errors=True)
        message = str(err) if isinstance(err, ImigueError) else f"{job.source}: {err}"
        return CutResult(job.video_id, error=message)
    for g in job.gestures:
        os.replace(scratch / f"{g.name}.mp4", job.folder / f"{g.name}.mp4")
    shutil.rmtree(scratch)
    return CutResult(job.video_id, tuple(int(v) for v in size))


def cut_serially(jobs: list[CutJob], workers: int = 1) -> Iterator[CutResult]:
    """The default runner: one video after another in this process. (`mg-ray convert-imigue`
    cuts them on Ray Data over the cluster instead: `mg_ray.prepare_job`.)"""
    for job in jobs:
        yield cut_job(job)


def convert(
    src: Path,
    out: Path,
    split_file: Path,
    *,
    videos: Path | None = None,
    layout: str = "imigue22",
    classes: Path | None = None,
    force: bool = False,
    log=print,
    run_cuts=None,
    workers: int = 1,
) -> Path:
    """Build the dataset at `out` from the raw release at `src`; returns its path.

    With `videos`, `run_cuts(jobs, workers)` cuts each long video's gestures (`cut_job`) and
    yields the results as they finish (default: `cut_serially`). The dataset is written to a
    stage folder beside `out` and renamed at the end: an interrupted run resumes, cutting only
    the videos not yet done; a video that cannot be read has its gestures left out and named."""
    if layout not in ("imigue22", "imigue35"):
        raise ImigueError(f"--layout: expected imigue22 or imigue35, got {layout!r}")
    src = Path(src).expanduser().absolute()
    if not src.is_dir():
        raise ImigueError(f"{src}: raw release folder not found")
    if videos is not None and not Path(videos).is_dir():
        raise ImigueError(f"--videos {videos}: folder not found")
    class_names = default_classes()
    if classes is not None:
        try:
            class_names = video_io.read_classes(Path(classes))
        except (FileNotFoundError, ValueError) as err:
            raise ImigueError(str(err)) from None
        if len(class_names) != NON_MG:
            raise ImigueError(
                f"--classes {classes}: expected {NON_MG} class names (ids 0..31), got {len(class_names)}"
            )
    splits = read_split_file(Path(split_file))
    folders = sorted(
        p for p in src.iterdir() if p.is_dir() and (p / f"{p.name}_label.csv").is_file()
    )
    if not folders:
        raise ImigueError(f"{src}: no video folders (<id>/<id>_light_hand.csv + <id>_label.csv)")
    missing = [p.name for p in folders if p.name not in splits]
    if missing:
        raise ImigueError(f"{split_file}: no split for video(s) {missing[:5]}")
    keep = list(IMIGUE22_FROM_35) if layout == "imigue22" else list(range(JOINTS))

    # read and check everything before writing
    per_video = []
    for folder in folders:
        skeleton_path = folder / f"{folder.name}_light_hand.csv"
        if not skeleton_path.is_file():
            raise ImigueError(f"{skeleton_path}: skeleton file not found")
        skeleton = read_skeleton_csv(skeleton_path)
        gestures = read_label_csv(folder / f"{folder.name}_label.csv", folder.name, len(skeleton))
        video = Path(videos) / f"{folder.name}.mp4" if videos is not None else None
        if video is not None and not video.is_file():
            raise ImigueError(f"{video}: video not found (--videos holds <id>.mp4 per video)")
        per_video.append((folder.name, skeleton[:, keep], gestures, video))

    annotations, split_lists = [], {}
    settings = {
        "src": str(src),
        "videos": str(videos) if videos else None,
        "split_file": str(Path(split_file).absolute()),
        "layout": layout,
        "classes": class_names,
    }
    stage, rows = video_io.open_stage(Path(out), settings, force, log)
    shapes = {r["video"]: tuple(r["img_shape"]) for r in rows}
    failed: dict[str, str] = {}
    if videos is not None:
        folder = stage / video_io.VIDEOS
        folder.mkdir(exist_ok=True)
        jobs = [
            CutJob(vid, video, tuple(gestures), folder)
            for vid, _, gestures, video in per_video
            if vid not in shapes
        ]
        total, done = len(jobs), 0
        with open(stage / video_io.JOURNAL, "a") as journal:
            for result in (run_cuts or cut_serially)(jobs, workers):
                done += 1
                if result.error:
                    failed[result.video_id] = result.error
                    log(f"  warning: {result.error} (its gestures are left out)")
                else:
                    shapes[result.video_id] = result.img_shape
                    row = {"video": result.video_id, "img_shape": list(result.img_shape)}
                    video_io.journal_line(journal, row)  # this video is resumable from here
                log(f"  {done}/{total} videos cut ({result.video_id})")
    for vid, skeleton, gestures, video in per_video:
        if vid in failed:
            continue
        img_shape = shapes[vid] if video is not None else IMG_SHAPE
        split, subject = splits[vid]
        for g in gestures:
            part = skeleton[g.start : g.end + 1]  # [T, V, 3]
            score = part[..., 2].copy()
            xy = part[..., :2].copy()
            xy[score <= 0] = 0.0  # undetected: (0, 0), score 0
            score[score < 0] = 0.0
            annotations.append(
                {
                    "frame_dir": g.name,
                    "label": g.label,
                    "img_shape": img_shape,
                    "original_shape": img_shape,
                    "total_frames": len(part),
                    "keypoint": np.ascontiguousarray(xy[None]),
                    "keypoint_score": np.ascontiguousarray(score[None]),
                    "subject": subject,
                }
            )
            split_lists.setdefault(split, []).append(g.name)
    video_io.write_annotations(stage, split_lists, annotations)
    video_io.write_classes(stage, class_names)
    video_io.write_metadata(
        stage,
        name=Path(out).name,
        layout=LAYOUTS[layout].name,
        num_classes=len(class_names),
        converter={
            "module": __name__,
            "src": str(src),
            "videos": str(videos) if videos else None,
            "split_file": str(Path(split_file).absolute()),
            "joints_kept": keep,
            "left_out_videos": sorted(failed),
        },
    )
    video_io.close_stage(stage, Path(out), force)
    log(
        f"  {len(annotations)} clips from {len(per_video) - len(failed)} videos; splits "
        + ", ".join(f"{k} {len(v)}" for k, v in split_lists.items())
        + ("" if videos else "; skeleton-only (no --videos)")
    )
    if failed:
        log(
            f"  warning: {len(failed)} video(s) could not be cut and their gestures were left "
            f"out: {', '.join(sorted(failed))}"
        )
    return Path(out).expanduser().absolute()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--src", type=Path, required=True, help="the raw release: one folder per video"
    )
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    parser.add_argument(
        "--split-file", type=Path, required=True, help="CSV video_id,split[,subject]"
    )
    parser.add_argument(
        "--videos", type=Path, help="folder of the long videos <id>.mp4 (default: skeleton only)"
    )
    parser.add_argument(
        "--layout",
        choices=("imigue22", "imigue35"),
        default="imigue22",
        help="22 joints as the organisers' ST-GCN and MiGA (default), or all 35",
    )
    parser.add_argument(
        "--classes", type=Path, help="32 class names, one a line (default: iMiGUE's)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing mg-ray dataset at --out"
    )


def run(args: argparse.Namespace, run_cuts=None) -> int:
    out = convert(
        args.src,
        args.out,
        args.split_file,
        videos=args.videos,
        layout=args.layout,
        classes=args.classes,
        force=args.force,
        run_cuts=run_cuts,
        workers=getattr(args, "workers", 1),
    )
    print(f"dataset written to {out} (check it with: mg-ray check-data {out})")
    return 0
