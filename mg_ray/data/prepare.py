"""`mg-ray prepare`: re-encode a dataset's clips for cheap random access.

Decoding a few frames spread over a long-GOP HD clip is slow, mostly because every
sampled frame needs the decoder to run from the previous keyframe at full resolution. Prepared
clips have a short side of 256 (aspect kept, even sizes) and a keyframe every `gop` frames, so a
random frame costs at most `gop` small decodes. Clips already at or below the short side keep
their size (never upscaled) and are only re-encoded with the short keyframe interval.

`--store` chooses how the frames are kept: `video` (H.264 clips as above), or a frame store for
random access without a decoder running from a keyframe: `jpeg` (one JPEG per frame,
`frames/<frame_dir>/img_00001.jpg`, the layout of mmaction2's rawframes) or `uint8` (one
`frames/<frame_dir>.npy` array [T, H, W, 3] per clip, read memory-mapped). `dataset.json`'s
`frame_store` names it, and `load_index` then reads the frames from there: the same
annotations, sampling and augmentations (`mg_ray.data.video.read_frames` reads all three). What
each costs, on disk and in samples/s: `benchmarks/bench_data.py` and the README.

The source dataset is never modified. The output is a new dataset folder in the same format:
keypoints and `img_shape` are scaled to the new frame size, `original_shape` is kept, every other
annotation field and the split are copied unchanged; `dataset.json` records the source's
fingerprint and the settings. `prepare` runs the clips through a runner (a local process pool
by default; `mg-ray prepare` uses Ray Data over the cluster, `mg_ray.prepare_job`), resumes an
interrupted run, and leaves out (and names) a clip it cannot read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mg_ray.data import video_io
from mg_ray.data.annotations import (
    STORE_EXTENSIONS,
    frame_dir_is_confined,
    safe_load_pickle,  # the restricted loader: never plain pickle
)


class PrepareError(RuntimeError):
    """The source dataset cannot be prepared (missing or unreadable clip, bad annotation)."""


def target_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side at `short_side` (never upscaled), aspect kept, even."""
    scale = min(1.0, short_side / min(height, width))

    def even(side: int) -> int:
        return max(2, round(side * scale / 2) * 2)

    return even(height), even(width)


def scale_keypoints(
    keypoint: np.ndarray, from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> np.ndarray:
    """Keypoints [..., 2] (x, y in pixels of a from_hw frame) mapped onto a to_hw frame.

    Pixel-centre convention: the scale is to/from per axis; (0, 0) marks an undetected joint in
    this format, and it stays (0, 0).
    """
    sx, sy = to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]
    return (keypoint * np.array([sx, sy], dtype=np.float32)).astype(np.float32)


STORES = tuple(STORE_EXTENSIONS)
FRAMES = "frames"  # the frame store's folder in a dataset


@dataclass(frozen=True)
class ClipJob:
    frame_dir: str
    source: Path
    target: Path
    short_side: int
    gop: int
    crf: int
    store: str = "video"
    quality: int = 90


def clip_target(folder: Path, frame_dir: str, store: str) -> Path:
    """Where a clip's frames go: a video file, a folder of JPEGs or an .npy array."""
    return folder / f"{frame_dir}{STORE_EXTENSIONS[store]}"


class FrameSink:
    """Receives a clip's resized frames one by one and writes them as `job.store` says, under a
    temporary name that `close` renames to `job.target`: a target that exists is complete (what
    a resumed `prepare` relies on)."""

    def __init__(self, job: ClipJob, out_hw: tuple[int, int], fps: float):
        self.job, self.frames, self.kept = job, 0, []
        job.target.parent.mkdir(parents=True, exist_ok=True)
        self.partial = job.target.with_name(f".{job.target.name}.partial")
        if self.partial.is_dir():
            shutil.rmtree(self.partial)  # an earlier, interrupted attempt
        if job.store == "video":
            self.writer = video_io.H264Writer(
                self.partial,
                out_hw[1],
                out_hw[0],
                fps=round(float(fps)),
                crf=job.crf,
                gop=job.gop,
            )
        elif job.store == "jpeg":
            self.partial.mkdir()

    def write(self, image: np.ndarray) -> None:
        self.frames += 1
        if self.job.store == "video":
            self.writer.write(image)
        elif self.job.store == "jpeg":
            from PIL import Image  # only a JPEG store needs Pillow

            name = self.partial / f"img_{self.frames:05d}.jpg"  # 1-based, as rawframes
            Image.fromarray(image).save(name, quality=self.job.quality, format="JPEG")
        else:
            self.kept.append(image)

    def close(self) -> None:
        if self.job.store == "video":
            self.writer.close()
        elif self.job.store == "uint8":
            with open(self.partial, "wb") as f:
                np.save(f, np.stack(self.kept))
        os.replace(self.partial, self.job.target)


def reencode_clip(job: ClipJob) -> tuple[str, int, tuple[int, int], tuple[int, int]]:
    """Decode `job.source`, resize, write `job.target` (`job.store`). Runs in a worker process.

    Returns (frame_dir, frames written, source (h, w), output (h, w)). Errors name the clip."""
    import av

    try:
        with av.open(str(job.source)) as container:
            stream = container.streams.video[0]
            fps = stream.average_rate or stream.guessed_rate or 25
            src_hw = (stream.codec_context.height, stream.codec_context.width)
            out_hw = target_size(*src_hw, job.short_side)
            sink = FrameSink(job, out_hw, fps)
            for frame in container.decode(stream):
                # AREA averages the pixels a target pixel covers: the right filter for shrinking.
                small = frame.reformat(
                    width=out_hw[1], height=out_hw[0], format="rgb24", interpolation="AREA"
                )
                sink.write(small.to_ndarray())
            sink.close()
            written = sink.frames
    except (av.FFmpegError, ValueError, OSError) as err:
        raise PrepareError(
            f"clip {job.frame_dir!r}: {job.source}: cannot re-encode: {err}"
        ) from None
    return job.frame_dir, written, src_hw, out_hw


@dataclass(frozen=True)
class ClipResult:
    """What `reencode_clip` did with one clip, or the error that stopped it."""

    frame_dir: str
    written: int = 0
    src_hw: tuple[int, int] = (0, 0)
    out_hw: tuple[int, int] = (0, 0)
    error: str | None = None


def prepare_clip(job: ClipJob) -> ClipResult:
    """`reencode_clip`, with a clip that cannot be read returned as its error, not raised: one
    bad clip does not stop the others."""
    try:
        name, written, src_hw, out_hw = reencode_clip(job)
    except PrepareError as err:
        partial = job.target.with_name(f".{job.target.name}.partial")
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink(missing_ok=True)
        return ClipResult(job.frame_dir, error=str(err))
    return ClipResult(name, written, tuple(src_hw), tuple(out_hw))


def in_processes(jobs: list[ClipJob], workers: int) -> Iterator[ClipResult]:
    """The default runner: `prepare_clip` in a local process pool, results as they finish.
    (`mg-ray prepare` runs them on Ray Data over the cluster instead: `mg_ray.prepare_job`.)"""
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(prepare_clip, jobs, chunksize=1)


def prepare(
    src: Path,
    out: Path,
    short_side: int = 256,
    gop: int = 8,
    crf: int = 20,
    workers: int = 2,
    force: bool = False,
    log=print,
    store: str = "video",
    quality: int = 90,
    run_jobs=None,
) -> Path:
    """Write a prepared copy of dataset `src` to `out`; returns `out`. See the module docstring.

    `run_jobs(jobs, workers)` runs `prepare_clip` over the clips and yields their results as
    they finish (default: `in_processes`). The dataset is written to a stage folder beside
    `out` and renamed to `out` at the end; an interrupted run leaves the stage, and the same
    command resumes it, skipping the clips already written. A clip that cannot be read is
    left out of the dataset and named in a warning (and in `dataset.json`'s `prepared`)."""
    src, out = Path(src).expanduser().absolute(), Path(out).expanduser().absolute()
    if not 16 <= short_side <= 4096:
        raise ValueError(f"short_side: expected an integer in [16, 4096], got {short_side}")
    if not 1 <= gop <= 300:
        raise ValueError(f"gop: expected an integer in [1, 300], got {gop}")
    if store not in STORES:
        raise ValueError(f"store: expected one of {', '.join(STORES)}, got {store!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: expected an integer in [1, 100], got {quality}")
    if not src.is_dir():
        raise PrepareError(f"{src}: source dataset folder not found")
    if out == src or src in out.parents or out in src.parents:
        raise PrepareError(
            f"{out}: the output must lie outside the source dataset {src} (and not contain it)"
        )

    data = safe_load_pickle(src / video_io.ANNOTATIONS)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("annotations"), list)
        or "split" not in data
    ):
        raise PrepareError(
            f"{src / video_io.ANNOTATIONS}: expected a dict with 'split' and an 'annotations' list"
        )
    annotations = data["annotations"]
    sources = []
    for i, ann in enumerate(annotations):
        where = f"{src / video_io.ANNOTATIONS}: annotation {i}"
        if not isinstance(ann, dict):
            raise PrepareError(f"{where}: expected a dict")
        for key in ("frame_dir", "img_shape", "keypoint"):
            if key not in ann:
                raise PrepareError(f"{where}: missing key {key!r}")
        if not isinstance(ann["frame_dir"], str) or not frame_dir_is_confined(ann["frame_dir"]):
            raise PrepareError(
                f"{where}: frame_dir: expected a relative name inside the dataset (no '..', no "
                f"absolute path), got {ann['frame_dir']!r}; nothing is written outside --out"
            )
        video = src / video_io.VIDEOS / f"{ann['frame_dir']}.mp4"
        if not video.is_file():
            raise PrepareError(f"clip {ann['frame_dir']!r}: video not found: {video}")
        sources.append((str(ann["frame_dir"]), video))
    classes = video_io.read_classes(src / video_io.CLASSES)
    source_meta_path = src / video_io.METADATA
    source_meta = (
        json.loads(source_meta_path.read_text())
        if source_meta_path.is_file()
        else {"name": src.name}
    )
    settings = {
        "source": str(src),
        "source_fingerprint": source_meta.get("fingerprint") or video_io.fingerprint(src),
        "short_side": short_side,
        "gop": gop,
        "crf": crf,
        "store": store,
        "quality": quality,
    }

    start = time.perf_counter()
    stage, rows = video_io.open_stage(out, settings, force, log)
    results = {
        r["frame_dir"]: ClipResult(
            r["frame_dir"], r["written"], tuple(r["src_hw"]), tuple(r["out_hw"])
        )
        for r in rows
    }
    folder = stage / (video_io.VIDEOS if store == "video" else FRAMES)
    folder.mkdir(exist_ok=True)
    jobs = [
        ClipJob(
            name,
            video,
            clip_target(folder, name, store),
            short_side,
            gop,
            crf,
            store,
            quality,
        )
        for name, video in sources
        if not (name in results and clip_target(folder, name, store).exists())
    ]
    failed: dict[str, str] = {}
    every = max(1, len(jobs) // 10)
    with open(stage / video_io.JOURNAL, "a") as journal:
        for n, result in enumerate((run_jobs or in_processes)(jobs, workers), 1):
            if result.error:
                failed[result.frame_dir] = result.error
                log(f"  warning: {result.error} (left out; the other clips go on)")
            else:
                results[result.frame_dir] = result
                row = {
                    "frame_dir": result.frame_dir,
                    "written": result.written,
                    "src_hw": list(result.src_hw),
                    "out_hw": list(result.out_hw),
                }
                video_io.journal_line(journal, row)  # the clip is resumable from here
            if n % every == 0 or n == len(jobs):
                log(f"  {n}/{len(jobs)} clips written ({time.perf_counter() - start:.1f} s)")

    prepared, short_videos = [], []
    for ann in annotations:
        name = str(ann["frame_dir"])
        if name in failed:
            continue
        result = results[name]
        img_hw = tuple(int(v) for v in ann["img_shape"])
        src_hw, out_hw = result.src_hw, result.out_hw
        # Keypoints live in img_shape pixels; the video should have the same aspect ratio.
        if abs(img_hw[1] / img_hw[0] - src_hw[1] / src_hw[0]) > 0.02:
            raise PrepareError(
                f"clip {name!r}: img_shape {img_hw} does not match the video's size {src_hw}"
            )
        new = dict(ann)
        new["keypoint"] = scale_keypoints(np.asarray(ann["keypoint"]), img_hw, out_hw)
        new["img_shape"] = out_hw
        new["original_shape"] = tuple(ann.get("original_shape", img_hw))
        if "total_frames" in ann and result.written != int(ann["total_frames"]):
            short_videos.append(f"{name} ({result.written} of {ann['total_frames']})")
        prepared.append(new)
    split = {k: [m for m in v if m not in failed] for k, v in data["split"].items()}
    video_io.write_annotations(stage, split, prepared)
    video_io.write_classes(stage, classes)
    meta = {k: v for k, v in source_meta.items() if k not in ("fingerprint", "frame_store")}
    meta["prepared"] = {
        "source": str(src),
        "source_fingerprint": source_meta.get("fingerprint"),
        "short_side": short_side,
        "gop": gop,
        "crf": crf,
        "left_out": sorted(failed),
    }
    if store != "video":
        meta["frame_store"] = {"format": store, "folder": FRAMES}
        meta["prepared"]["quality"] = quality if store == "jpeg" else None
    video_io.write_metadata(stage, **meta)
    video_io.close_stage(stage, out, force)
    if short_videos:
        log(
            f"  warning: {len(short_videos)} clip(s) decode to a frame count other than total_frames, "
            f"kept as they are: {', '.join(short_videos[:5])}{' ...' if len(short_videos) > 5 else ''}"
        )
    if failed:
        log(
            f"  warning: {len(failed)} clip(s) could not be read and were left out of {out}: "
            + ", ".join(sorted(failed)[:10])
            + (" ..." if len(failed) > 10 else "")
        )
    return out
