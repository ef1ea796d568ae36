"""Reading frames with decord, one reader per call.

decord's `VideoReader` is opened inside the call and dropped at its end: readers must never be
created in the DataLoader's parent process (with fork the worker hangs, with spawn a reader
cannot be pickled) and long-lived readers grow in memory (docs/stack.md).
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
    import decord  # imported here: decord is only needed where videos are read

    path = Path(path)
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


def video_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the video's frames."""
    import decord

    path = Path(path)
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
