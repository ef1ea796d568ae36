"""Writing datasets: H.264 clips through PyAV, the annotation pickle, and safe folder replacement.

Shared by `mg-ray synth`, `mg-ray prepare` and `mg-ray convert-openpose`. Reading datasets belongs
to `mg_ray.data.annotations` / `mg_ray.data.dataset`; nothing here interprets annotations.

Every writer builds its dataset in a hidden temporary sibling of the target folder and renames it
into place at the end (`staged_output`), so an interrupted run never leaves half a dataset behind,
and an existing folder is only ever replaced when the caller passed `force` and the folder looks
like an mg-ray dataset (has `dataset.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray.data.annotations import annotation_files

ANNOTATIONS = "annotations.pkl"
CLASSES = "classes.txt"
METADATA = "dataset.json"
VIDEOS = "videos"
PICKLE_PROTOCOL = 4


class DatasetWriteError(RuntimeError):
    """The output folder cannot be written (exists, not a dataset, not writable)."""


# ---------------------------------------------------------------------------------------------
# Videos


class H264Writer:
    """Streaming H.264/mp4 encoder for uint8 RGB frames [H, W, 3] (H and W even).

    No B-frames, one encoder thread: the file decodes to exactly the frames written, presentation
    order equals decode order, and the same frames always give the same bytes (x264 is
    deterministic single-threaded). `gop` is the keyframe interval: short intervals make random
    access cheap, at some cost in file size.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: int = 25,
        crf: int = 18,
        gop: int = 12,
        preset: str = "veryfast",
    ) -> None:
        import av  # imported here: only writers need PyAV

        if width % 2 or height % 2:
            raise ValueError(
                f"{path}: H.264 (yuv420p) needs even frame sizes, got {width}x{height}"
            )
        self.path, self.size, self.frames = path, (height, width), 0
        self._av = av
        self._container = av.open(str(path), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            "g": str(gop),
            "keyint_min": str(gop),
            "bf": "0",
            "threads": "1",
        }
        self._stream = stream

    def write(self, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or image.shape != self.size + (3,):
            raise ValueError(
                f"{self.path}: expected uint8 frame {self.size + (3,)}, got {image.dtype} {image.shape}"
            )
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self.frames == 0:
                raise ValueError(f"{self.path}: no frames to write")
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._container is not None:
            self._container.close()  # the file is incomplete; the staged folder goes with it
            self._container = None
        self.close()


def write_video(
    path: Path, frames: np.ndarray, fps: int = 25, crf: int = 18, gop: int = 12
) -> None:
    """Encode uint8 RGB frames [T, H, W, 3] as one H.264 mp4 clip (see `H264Writer`)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"{path}: expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    with H264Writer(path, frames.shape[2], frames.shape[1], fps=fps, crf=crf, gop=gop) as writer:
        for image in frames:
            writer.write(image)


# ---------------------------------------------------------------------------------------------
# Annotation file and metadata


def write_annotations(folder: Path, split: dict[str, list[str]], annotations: list[dict]) -> Path:
    """Write `annotations.pkl` in the PoseConv3D layout (plain containers + numpy arrays)."""
    path = folder / ANNOTATIONS
    with open(path, "wb") as f:
        pickler = pickle.Pickler(f, protocol=PICKLE_PROTOCOL)
        # No memo: the bytes then depend only on the values, not on which equal strings happen to
        # be the same object (they differ when annotations come back from worker processes), so
        # the same dataset always has the same fingerprint. Safe: the structure has no cycles.
        pickler.fast = True
        pickler.dump({"split": split, "annotations": annotations})
    return path


def write_classes(folder: Path, classes: list[str]) -> Path:
    for name in classes:
        if not name or "\n" in name or name != name.strip():
            raise ValueError(f"class name {name!r}: must be non-empty, one line, no outer spaces")
    path = folder / CLASSES
    path.write_text("".join(f"{name}\n" for name in classes))
    return path


def fingerprint(folder: Path) -> str:
    """sha256 over annotations.pkl then classes.txt: identifies the dataset's content for lineage.
    A folder of one pickle per split (the MiGA releases) hashes each `<split>.pkl`, by name then
    content, in name order, in place of annotations.pkl.

    Videos are not hashed (too slow for large sets); they are named by the annotations.
    """
    digest = hashlib.sha256()
    for path in [*annotation_files(folder, ANNOTATIONS), folder / CLASSES]:
        if path.name == CLASSES and not path.is_file():
            continue  # a dataset whose class names are built in (its layout's)
        if path.name != ANNOTATIONS and path.name != CLASSES:
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(root: str | Path | None) -> str:
    """The fingerprint of the dataset in folder `root`: the one its `dataset.json` records, else
    `fingerprint(root)` computed now (a folder written by other tools); "unknown" without data."""
    if not root:
        return "unknown"
    folder = Path(root).expanduser()
    meta = folder / METADATA
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get("fingerprint")
        if recorded:
            return str(recorded)
    if (folder / ANNOTATIONS).is_file() or any(folder.glob("*.pkl")):
        return fingerprint(folder)
    return "unknown"


def write_metadata(folder: Path, **fields: Any) -> dict:
    """Write `dataset.json` with the given fields plus the fingerprint; returns what was written."""
    meta = dict(fields)
    meta["fingerprint"] = fingerprint(folder)
    (folder / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_classes(path: Path) -> list[str]:
    """Class names, one per line, in label-id order (blank lines at the end are ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classes file not found")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"{path}:{i + 1}: empty class name")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{path}: class {dup!r} is listed twice")
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


# ---------------------------------------------------------------------------------------------
# Output folder handling


def check_output_folder(out: Path, force: bool) -> None:
    """Refuse to touch anything a user already has unless it is an mg-ray dataset and `force`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetWriteError(f"{out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise DatasetWriteError(
            f"{out}: folder exists and is not empty; pass --force to replace an mg-ray dataset "
            "there, or choose another --out"
        )
    if not (out / METADATA).is_file():
        raise DatasetWriteError(
            f"{out}: not an mg-ray dataset (no {METADATA}); refusing to replace it even with "
            "--force. Choose another --out"
        )


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success it replaces `out` atomically enough.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out).expanduser().absolute()
    check_output_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        replace_with(stage, out, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_with(stage: Path, out: Path, force: bool) -> None:
    """Put the finished folder `stage` where `out` is, checking `out` again first (another
    process may have created it meanwhile); an existing mg-ray dataset there goes only with
    `force`."""
    check_output_folder(out, force)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


JOURNAL = ".journal.jsonl"  # in a stage folder: one JSON line per unit of work done
SETTINGS = ".settings.json"  # in a stage folder: what it is being written with


def open_stage(
    out: Path, settings: dict[str, Any], force: bool, log
) -> tuple[Path, list[dict[str, Any]]]:
    """A resumable stage folder `.<out>.partial` beside `out` and the journal lines an
    interrupted run with the same `settings` left in it (a line cut by the interruption is
    dropped: that unit is redone). A stage left with other settings is started afresh. Finish
    with `close_stage`."""
    out = Path(out).expanduser().absolute()
    check_output_folder(out, force)
    stage = out.parent / f".{out.name}.partial"
    rows: list[dict[str, Any]] = []
    if stage.is_dir():
        try:
            same = json.loads((stage / SETTINGS).read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            log(f"  {stage}: left by a run with other settings; starting afresh")
            shutil.rmtree(stage)
    if stage.is_dir():
        journal = stage / JOURNAL
        for line in journal.read_text().splitlines() if journal.is_file() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        log(f"  resuming in {stage}: {len(rows)} already written")
    else:
        stage.mkdir(parents=True)
        (stage / SETTINGS).write_text(json.dumps(settings))
    return stage, rows


def journal_line(journal, row: dict[str, Any]) -> None:
    """Append one finished unit's line to an open journal and flush it: resumable from now."""
    journal.write(json.dumps(row) + "\n")
    journal.flush()


def close_stage(stage: Path, out: Path, force: bool) -> None:
    """Drop the stage's journal and settings and put it in place of `out`."""
    for name in (JOURNAL, SETTINGS):
        (stage / name).unlink(missing_ok=True)
    replace_with(stage, Path(out).expanduser().absolute(), force)
