"""The rows of a pyfunc request: one clip each, its video and skeleton as bytes, paths or arrays.

A request is a table (a pandas DataFrame, a list of row dicts or a dict of columns) with:

    video          the bytes of a video file (JSON: base64, as MLflow encodes a binary column),
                   or, from Python, its path or URI (or a frame store's clip, `mg-ray prepare`)
    skeleton       the bytes of a skeleton file (.npz or .json, `mg_ray.data.load_skeleton`'s
                   formats), or, from Python, its path or URI, or the arrays themselves
                   ({"keypoint": [M, T, V, 2], "keypoint_score": [M, T, V], "img_shape": (h, w)})
    video_path     a path or URI the server can read (file://, s3://, ...), for JSON callers:
    skeleton_path  a JSON string in a binary column is read as base64, never as a path
    clip           a name for the clip, used in error messages (default: its row number)

Each row needs a skeleton, and a video unless the model is pose-only and the skeleton says its
frame size (`img_shape`). A row that cannot be read is a `ClipRequestError` naming the clip and
the field.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray.data.dataset import SkeletonError, parse_skeleton, skeleton_arrays

COLUMNS = ("video", "skeleton", "video_path", "skeleton_path", "clip")


class ClipRequestError(ValueError):
    """A request row that cannot be classified; the message names the clip and the field."""


@dataclass
class Clip:
    """One row, read: its name for messages (`clip 'x'` or `row 3`), a local video file (or
    None) and the skeleton's arrays."""

    name: str
    video: Path | None
    keypoint: np.ndarray
    keypoint_score: np.ndarray
    img_shape: tuple[int, int] | None


def request_rows(model_input: Any) -> list[dict[str, Any]]:
    """The request as a list of row dicts, whatever table form it came in."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, Mapping):
        columns = {
            k: list(np.atleast_1d(np.asarray(v, dtype=object))) for k, v in model_input.items()
        }
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ClipRequestError(f"the request's columns differ in length ({sorted(lengths)})")
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    elif isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        rows = [dict(r) for r in model_input]
    else:
        raise ClipRequestError(
            f"expected a table of clips (columns {', '.join(COLUMNS)}), got {type(model_input).__name__}"
        )
    unknown = sorted({k for row in rows for k in row} - set(COLUMNS))
    if unknown:
        raise ClipRequestError(
            f"unknown column(s) {', '.join(unknown)}; a clip has {', '.join(COLUMNS)}"
        )
    return [{k: v for k, v in row.items() if not _missing(v)} for row in rows]


def _missing(value: Any) -> bool:
    """A cell left empty (None, or NaN where pandas filled a column some rows lack)."""
    return value is None or (isinstance(value, float) and np.isnan(value))


@contextlib.contextmanager
def read_clip(row: dict[str, Any], i: int, needs_video: bool) -> Iterator[Clip]:
    """Row `i` read into a `Clip`; video bytes live in a temporary file until the block ends."""
    name = f"clip {row['clip']!r}" if "clip" in row else f"row {i}"
    keypoint, score, img_shape = _skeleton(row, name)
    with tempfile.TemporaryDirectory(prefix="mg-ray-clip-") as scratch:
        # a pose-only model whose skeleton gives the frame size reads no video (a skeleton-only
        # dataset has none)
        video = (
            None if not needs_video and img_shape is not None else _video(row, name, Path(scratch))
        )
        if video is None and (needs_video or img_shape is None):
            raise ClipRequestError(
                f"{name}: video: missing (give `video` bytes or a `video_path`"
                + ("" if needs_video else "; a pose-only model needs one only for the frame size")
                + ")"
            )
        yield Clip(name, video, keypoint, score, img_shape)


def _skeleton(row: dict[str, Any], name: str):
    where = f"{name}: skeleton"
    value = row.get("skeleton", row.get("skeleton_path"))
    if value is None:
        raise ClipRequestError(f"{where}: missing (give `skeleton` or `skeleton_path`)")
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return parse_skeleton(bytes(value), where)
        if isinstance(value, Mapping):
            return skeleton_arrays(dict(value), where)
        if isinstance(value, str):
            return parse_skeleton(_read_location(value, where), where)
    except SkeletonError as err:
        raise ClipRequestError(str(err)) from None
    raise ClipRequestError(
        f"{where}: expected file bytes, a path or the keypoint arrays, got {type(value).__name__}"
    )


def _video(row: dict[str, Any], name: str, scratch: Path) -> Path | None:
    where = f"{name}: video"
    value = row.get("video", row.get("video_path"))
    if value is None:
        return None
    if isinstance(value, str):
        local = _local_path(value)
        if local is not None:  # a video file, or a frame store's clip (folder or .npy)
            if not local.exists():
                raise ClipRequestError(f"{where}: {value}: no such file")
            return local
        value = _read_location(value, where)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ClipRequestError(
            f"{where}: expected file bytes or a path, got {type(value).__name__}"
        )
    if not len(value):
        raise ClipRequestError(f"{where}: empty (0 bytes)")
    path = scratch / "clip.mp4"
    path.write_bytes(bytes(value))
    return path


def _local_path(location: str) -> Path | None:
    """A plain path or file:// URI as a local path; None for another URI scheme."""
    if location.startswith("file://"):
        return Path(location[len("file://") :])
    if "://" in location:
        return None
    return Path(location).expanduser()


def _read_location(location: str, where: str) -> bytes:
    """The bytes at a path or URI (other schemes through MLflow's artifact repositories)."""
    local = _local_path(location)
    if local is not None:
        if not local.is_file():
            raise ClipRequestError(f"{where}: {location}: no such file")
        return local.read_bytes()
    import mlflow.artifacts  # heavy: only for remote URIs

    try:
        with tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=folder)
            return Path(path).read_bytes()
    except Exception as err:  # noqa: BLE001 (each artifact repository raises its own errors)
        raise ClipRequestError(f"{where}: {location}: cannot be read ({err})") from None
