"""Reading frames: from a video with decord, one reader per call, or from a frame store.

decord's `VideoReader` is opened inside the call and dropped at its end: readers must never be
created in the DataLoader's parent process (with fork the worker hangs, with spawn a reader
cannot be pickled) and long-lived readers grow in memory (docs/stack.md).

A clip of a frame store (`mg-ray prepare --store`, `mg_ray.data.prepare`) is a folder of JPEGs
`img_00001.jpg`, ... (mmaction2's rawframes naming, 1-based) or a uint8 `.npy` array
[T, H, W, 3]; `read_frames` and `video_size` read those by the path's kind, with the same
clamping and errors as for a video.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoError(RuntimeError):
    """A clip's video is missing, unreadable or truncated."""


@dataclass
class Frames:
    """Decoded frames uint8 [K, H, W, 3] for the requested indices, the number of frames the
    reader reports, and whether the requested indices had to be clamped to it."""

    frames: np.ndarray
    num_frames: int
    clamped: bool


def read_frames(
    path: str | Path, indices: np.ndarray, expected_frames: int | None = None
) -> Frames:
    """Decode frames `indices` (int [K], any order, repeats allowed) of the video at `path`.

    Indices beyond the frames the container really holds (a clip shorter than its annotation's
    total_frames) are clamped to the last frame, and `clamped` says so. Every failure is a
    `VideoError` naming the file.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".npy":
        return read_stored_frames(path, indices, expected_frames)
    import decord  # imported here: decord is only needed where videos are read

    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as err:  # noqa: BLE001 (decord raises DECORDError, RuntimeError, ...)
        raise VideoError(
            f"{path}: cannot open video (corrupt or not a video?): {_short(err)}"
        ) from None
    try:
        num_frames = len(reader)
        if num_frames < 1:
            raise VideoError(f"{path}: video has no frames")
        indices = np.asarray(indices, dtype=np.int64)
        clamped = bool((indices >= num_frames).any()) or (
            expected_frames is not None and num_frames < expected_frames
        )
        wanted = np.minimum(indices, num_frames - 1)
        # Decode each distinct frame once, in order (cheapest for seeking), then expand.
        unique, inverse = np.unique(wanted, return_inverse=True)
        try:
            batch = reader.get_batch(unique.tolist()).asnumpy()
        except VideoError:
            raise
        except Exception as err:  # noqa: BLE001 (any decoder error)
            raise VideoError(
                f"{path}: decoding frames failed (truncated or corrupt video?): {_short(err)}"
            ) from None
        if batch.ndim != 4 or batch.shape[0] != len(unique):
            raise VideoError(f"{path}: decoder returned {batch.shape} for {len(unique)} frames")
        return Frames(batch[inverse.reshape(-1)], num_frames, clamped)
    finally:
        del reader


def read_stored_frames(
    path: Path, indices: np.ndarray, expected_frames: int | None = None
) -> Frames:
    """`read_frames` of a frame store's clip: a folder of JPEGs or a uint8 .npy array."""
    indices = np.asarray(indices, dtype=np.int64)
    if path.suffix == ".npy":
        try:
            frames = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise VideoError(f"{path}: cannot read the frame array: {_short(err)}") from None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(
                f"{path}: expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}"
            )
        num_frames = len(frames)
    else:
        num_frames = sum(1 for _ in path.glob("img_*.jpg"))
    if num_frames < 1:
        raise VideoError(f"{path}: the clip has no frames")
    clamped = bool((indices >= num_frames).any()) or (
        expected_frames is not None and num_frames < expected_frames
    )
    unique, inverse = np.unique(np.minimum(indices, num_frames - 1), return_inverse=True)
    if path.suffix == ".npy":
        batch = np.asarray(frames[unique])
    else:
        batch = np.stack([_read_jpeg(path / f"img_{i + 1:05d}.jpg") for i in unique])
    return Frames(batch[inverse.reshape(-1)], num_frames, clamped)


def _read_jpeg(path: Path) -> np.ndarray:
    from PIL import Image  # only a JPEG frame store needs Pillow

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as err:
        raise VideoError(f"{path}: cannot read the frame: {_short(err)}") from None


def video_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the video's frames (or of a frame store's clip)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".npy":
        h, w = read_stored_frames(path, np.zeros(1, np.int64)).frames.shape[1:3]
        return int(h), int(w)
    import decord

    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        h, w = reader[0].shape[:2]
    except Exception as err:  # noqa: BLE001 (any decoder error)
        raise VideoError(f"{path}: cannot open video: {_short(err)}") from None
    return int(h), int(w)


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
