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
fingerprint and the settings. Clips are encoded by a small process pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mg_ray.data import video_io
from mg_ray.data.annotations import (
    AnnotationError,
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


STORES = ("video", "jpeg", "uint8")
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
    return folder / f"{frame_dir}{store_extension(store)}"


def store_extension(store: str) -> str:
    """The suffix `DatasetIndex.video_path` adds to a frame_dir for each kind of store."""
    return {"video": ".mp4", "jpeg": "", "uint8": ".npy"}[store]


class FrameSink:
    """Receives a clip's resized frames one by one and writes them as `job.store` says."""

    def __init__(self, job: ClipJob, out_hw: tuple[int, int], fps: float):
        self.job, self.frames, self.kept = job, 0, []
        job.target.parent.mkdir(parents=True, exist_ok=True)
        if job.store == "video":
            self.writer = video_io.H264Writer(
                job.target, out_hw[1], out_hw[0], fps=round(float(fps)), crf=job.crf, gop=job.gop
            )
        elif job.store == "jpeg":
            job.target.mkdir()

    def write(self, image: np.ndarray) -> None:
        self.frames += 1
        if self.job.store == "video":
            self.writer.write(image)
        elif self.job.store == "jpeg":
            from PIL import Image  # only a JPEG store needs Pillow

            name = self.job.target / f"img_{self.frames:05d}.jpg"  # 1-based, as rawframes
            Image.fromarray(image).save(name, quality=self.job.quality)
        else:
            self.kept.append(image)

    def close(self) -> None:
        if self.job.store == "video":
            self.writer.close()
        elif self.job.store == "uint8":
            np.save(self.job.target, np.stack(self.kept))


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
) -> Path:
    """Write a prepared copy of dataset `src` to `out`; returns `out`. See the module docstring."""
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
    jobs = []
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
        jobs.append(ClipJob(str(ann["frame_dir"]), video, Path(), short_side, gop, crf))
    classes = video_io.read_classes(src / video_io.CLASSES)
    source_meta_path = src / video_io.METADATA
    source_meta = (
        json.loads(source_meta_path.read_text())
        if source_meta_path.is_file()
        else {"name": src.name}
    )

    start = time.perf_counter()
    with video_io.staged_output(out, force) as stage:
        videos = stage / (video_io.VIDEOS if store == "video" else FRAMES)
        videos.mkdir()
        jobs = [
            ClipJob(
                j.frame_dir,
                j.source,
                clip_target(videos, j.frame_dir, store),
                j.short_side,
                j.gop,
                j.crf,
                store,
                quality,
            )
            for j in jobs
        ]
        results: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {}
        every = max(1, len(jobs) // 10)
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for n, (name, written, src_hw, out_hw) in enumerate(
                pool.map(reencode_clip, jobs, chunksize=4), 1
            ):
                results[name] = (written, src_hw, out_hw)
                if n % every == 0 or n == len(jobs):
                    log(f"  {n}/{len(jobs)} clips written ({time.perf_counter() - start:.1f} s)")

        prepared, short_videos = [], []
        for ann in annotations:
            written, src_hw, out_hw = results[str(ann["frame_dir"])]
            img_hw = tuple(int(v) for v in ann["img_shape"])
            # Keypoints live in img_shape pixels; the video should have the same aspect ratio.
            if abs(img_hw[1] / img_hw[0] - src_hw[1] / src_hw[0]) > 0.02:
                raise PrepareError(
                    f"clip {ann['frame_dir']!r}: img_shape {img_hw} does not match the video's size {src_hw}"
                )
            new = dict(ann)
            new["keypoint"] = scale_keypoints(np.asarray(ann["keypoint"]), img_hw, out_hw)
            new["img_shape"] = out_hw
            new["original_shape"] = tuple(ann.get("original_shape", img_hw))
            if "total_frames" in ann and written != int(ann["total_frames"]):
                short_videos.append(f"{ann['frame_dir']} ({written} of {ann['total_frames']})")
            prepared.append(new)
        video_io.write_annotations(stage, data["split"], prepared)
        video_io.write_classes(stage, classes)
        meta = {k: v for k, v in source_meta.items() if k != "fingerprint"}
        meta["prepared"] = {
            "source": str(src),
            "source_fingerprint": source_meta.get("fingerprint"),
            "short_side": short_side,
            "gop": gop,
            "crf": crf,
        }
        meta.pop("frame_store", None)
        if store != "video":
            meta["frame_store"] = {"format": store, "folder": FRAMES}
            meta["prepared"]["quality"] = quality if store == "jpeg" else None
        video_io.write_metadata(stage, **meta)
    if short_videos:
        log(
            f"  warning: {len(short_videos)} clip(s) decode to a frame count other than total_frames, "
            f"kept as they are: {', '.join(short_videos[:5])}{' ...' if len(short_videos) > 5 else ''}"
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="source dataset folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="new dataset folder")
    parser.add_argument(
        "--short-side", type=int, default=256, help="target short side in pixels (never upscales)"
    )
    parser.add_argument("--gop", type=int, default=8, help="keyframe interval in frames")
    parser.add_argument(
        "--crf", type=int, default=20, help="x264 quality (lower is better, larger)"
    )
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="encoding processes"
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default="video",
        help="how frames are kept: H.264 clips, or a frame store of JPEGs or uint8 arrays",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of --store jpeg")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing mg-ray dataset at --out"
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        out = prepare(
            args.src,
            args.out,
            args.short_side,
            args.gop,
            args.crf,
            args.workers,
            args.force,
            store=args.store,
            quality=args.quality,
        )
    except (
        PrepareError,
        AnnotationError,
        ValueError,
        FileNotFoundError,
        video_io.DatasetWriteError,
    ) as err:
        print(f"mg-ray prepare: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    meta = json.loads((out / video_io.METADATA).read_text())
    folder = out / (video_io.VIDEOS if args.store == "video" else FRAMES)
    clips = sum(1 for _ in folder.glob(f"*{store_extension(args.store)}"))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    how = f"keyframe every {args.gop} frames" if args.store == "video" else f"{args.store} frames"
    print(f"prepared dataset written to {out}")
    print(
        f"  {clips} clips, short side <= {args.short_side}, {how}, {size / 2**20:.1f} MiB, "
        f"fingerprint {meta['fingerprint'][:16]}, {seconds:.1f} s"
    )
    return 0
