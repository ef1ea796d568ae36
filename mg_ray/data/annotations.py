"""Loading a dataset folder: a restricted unpickler, entry validation and the dataset index.

A dataset folder holds

    annotations.pkl   {"split": {name: [frame_dir, ...]}, "annotations": [entry, ...]}
    videos/<frame_dir>.mp4
    classes.txt       one class name per line, in label-id order
    dataset.json      optional metadata: {"layout": "coco17", "fingerprint": "...", ...}

with each entry in the PoseConv3D / mmaction2 layout:

    frame_dir       str
    label           int in [0, number of classes)
    img_shape       (h, w): the pixel frame the keypoints are expressed in
    original_shape  (h, w)
    total_frames    int T
    keypoint        float [M, T, V, 2] pixel (x, y)
    keypoint_score  float [M, T, V] in [0, 1]

Extra keys (e.g. "subject") are kept and ignored.

Unpickling an untrusted file runs arbitrary code, so `annotations.pkl` is read only through
`RestrictedUnpickler`, which admits plain containers, numbers, strings and what numpy arrays,
dtypes and scalars need (numpy 1 and numpy 2 module names). Any other global is refused with an
`AnnotationError` naming the file and the global; its code never runs.

Every problem found while validating is an `AnnotationError` naming the file, the entry's
frame_dir and the field: missing keys, wrong shapes or dtypes, NaN/inf keypoints, label out of
range, split names listing unknown frame_dirs.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mg_ray.data.layouts import COCO17, KeypointLayout, get_layout


class AnnotationError(ValueError):
    """A dataset's annotation file or metadata is unsafe, malformed or inconsistent."""


# --------------------------------------------------------------------------------------------
# restricted unpickling


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The few numpy callables an array/dtype/scalar pickle needs, under both numpy 1
    (`numpy.core`) and numpy 2 (`numpy._core`) module names, resolved here to the objects of the
    installed numpy so that nothing is imported by name from the file."""
    try:
        from numpy._core import multiarray, numeric  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 array pickles
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                 "int", "float", "bool", "complex", "slice")
}


def _builtin_globals() -> dict[tuple[str, str], Any]:
    import codecs
    import collections

    allowed = {}
    for module in ("builtins", "__builtin__"):  # "__builtin__": protocol 0-2 pickles from Python 2
        for name, obj in _BUILTINS.items():
            allowed[(module, name)] = obj
    # Protocol 0-2 pickles store bytes (e.g. an array's buffer) as _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an allow-list of globals (containers, numbers, strings,
    numpy arrays); anything else raises `AnnotationError` before it can be called."""

    def __init__(self, file: io.BufferedIOBase, source: str = "<pickle>") -> None:
        super().__init__(file)
        self.source = source
        self.allowed = {**_builtin_globals(), **_numpy_globals()}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise AnnotationError(
                f"{self.source}: refused to load global {module}.{name}: annotation pickles may "
                f"only hold containers, numbers, strings and numpy arrays (a pickle that names "
                f"other globals can run code when loaded)"
            ) from None


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    with path.open("rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except AnnotationError:
            raise
        except Exception as err:  # noqa: BLE001 (truncated, or not a pickle at all: any error)
            raise AnnotationError(f"{path}: not a readable annotation pickle: {err}") from None


# --------------------------------------------------------------------------------------------
# validation


REQUIRED_KEYS = ("frame_dir", "label", "img_shape", "total_frames", "keypoint", "keypoint_score")


@dataclass
class Annotation:
    """One validated clip. keypoint float32 [M, T, V, 2] (pixels of `img_shape`),
    keypoint_score float32 [M, T, V]."""

    frame_dir: str
    label: int
    img_shape: tuple[int, int]
    total_frames: int
    keypoint: np.ndarray
    keypoint_score: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


def validate_entry(
    entry: Any, num_classes: int, num_joints: int, source: str, position: int
) -> Annotation:
    """Check one raw annotation dict and return it as an `Annotation`.

    Raises `AnnotationError` naming `source`, the entry's frame_dir (or its position when that
    is missing) and the field.
    """
    if not isinstance(entry, dict):
        raise AnnotationError(f"{source}: annotations[{position}]: expected a dict, got {type(entry).__name__}")
    frame_dir = entry.get("frame_dir")
    where = f"{source}: clip {frame_dir!r}" if isinstance(frame_dir, str) else f"{source}: annotations[{position}]"

    def fail(key: str, message: str) -> AnnotationError:
        return AnnotationError(f"{where}: {key}: {message}")

    for key in REQUIRED_KEYS:
        if key not in entry:
            raise fail(key, "missing key")
    if not isinstance(frame_dir, str) or not frame_dir:
        raise fail("frame_dir", f"expected a non-empty string, got {frame_dir!r}")

    label = entry["label"]
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise fail("label", f"expected an integer, got {label!r}")
    if not 0 <= int(label) < num_classes:
        raise fail("label", f"expected a class id in [0, {num_classes}) (classes.txt), got {int(label)}")

    img_shape = entry["img_shape"]
    if (not isinstance(img_shape, (tuple, list, np.ndarray)) or len(img_shape) != 2
            or not all(isinstance(v, (int, np.integer)) and v > 0 for v in img_shape)):
        raise fail("img_shape", f"expected (height, width) positive integers, got {img_shape!r}")

    total_frames = entry["total_frames"]
    if isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise fail("total_frames", f"expected an integer >= 1, got {total_frames!r}")

    keypoint, score = entry["keypoint"], entry["keypoint_score"]
    for key, arr in (("keypoint", keypoint), ("keypoint_score", score)):
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            raise fail(key, f"expected a numeric numpy array, got {type(arr).__name__}"
                       + (f" of dtype {arr.dtype}" if isinstance(arr, np.ndarray) else ""))
    if keypoint.ndim != 4 or keypoint.shape[-1] != 2:
        raise fail("keypoint", f"expected shape [M, T, V, 2], got {list(keypoint.shape)}")
    m, t, v, _ = keypoint.shape
    if v != num_joints:
        raise fail("keypoint", f"expected V = {num_joints} joints (the dataset's keypoint layout), got {v}")
    if score.shape != (m, t, v):
        raise fail("keypoint_score", f"expected shape [M, T, V] = {[m, t, v]} (as keypoint), got {list(score.shape)}")
    if t != int(total_frames):
        raise fail("keypoint", f"expected T = total_frames = {int(total_frames)} frames, got {t}")
    if not np.isfinite(keypoint).all():
        bad = np.argwhere(~np.isfinite(keypoint))[0]
        raise fail("keypoint", f"contains NaN/inf (first at person {bad[0]}, frame {bad[1]}, joint {bad[2]})")
    if not np.isfinite(score).all():
        raise fail("keypoint_score", "contains NaN/inf")

    extra = {k: val for k, val in entry.items() if k not in REQUIRED_KEYS}
    return Annotation(
        frame_dir=frame_dir,
        label=int(label),
        img_shape=(int(img_shape[0]), int(img_shape[1])),
        total_frames=int(total_frames),
        keypoint=np.ascontiguousarray(keypoint, dtype=np.float32),
        keypoint_score=np.ascontiguousarray(score, dtype=np.float32),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# the dataset index


@dataclass
class DatasetIndex:
    """A loaded, validated dataset folder."""

    root: Path
    class_names: list[str]
    splits: dict[str, list[Annotation]]
    video_root: Path
    video_ext: str
    layout: KeypointLayout
    fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def video_path(self, frame_dir: str) -> Path:
        return self.video_root / f"{frame_dir}{self.video_ext}"

    def split(self, name: str) -> list[Annotation]:
        try:
            return self.splits[name]
        except KeyError:
            raise AnnotationError(
                f"{self.root}: no split named {name!r}; the annotation file has "
                f"{', '.join(repr(s) for s in self.splits) or 'none'}"
            ) from None


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise AnnotationError(f"{path}: class list not found (one class name per line, in id order)")
    names = [line.strip() for line in path.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise AnnotationError(f"{path}: expected one non-empty class name per line")
    return names


def load_index(
    root: str | Path,
    layout: str | None = None,
    annotation_file: str = "annotations.pkl",
    video_dir: str = "videos",
    video_ext: str = ".mp4",
) -> DatasetIndex:
    """Load and validate the dataset folder `root`.

    `layout`: keypoint layout name; None takes dataset.json's "layout", else coco17.
    Does not open any video (that happens per item, in the loader's workers).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AnnotationError(f"{root}: dataset folder not found")
    metadata: dict[str, Any] = {}
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            metadata = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{meta_path}: not valid JSON: {err}") from None
        if not isinstance(metadata, dict):
            raise AnnotationError(f"{meta_path}: expected a JSON object")
    layout_name = layout or metadata.get("layout")
    try:
        kp_layout = get_layout(layout_name) if layout_name else COCO17
    except ValueError as err:
        raise AnnotationError(f"{meta_path if not layout else 'layout'}: {err}") from None

    class_names = read_class_names(root / "classes.txt")
    ann_path = root / annotation_file
    data = safe_load_pickle(ann_path)
    source = str(ann_path)
    if not isinstance(data, dict) or "annotations" not in data or "split" not in data:
        raise AnnotationError(f"{source}: expected a dict with keys 'split' and 'annotations'")
    raw, split_map = data["annotations"], data["split"]
    if not isinstance(raw, list):
        raise AnnotationError(f"{source}: annotations: expected a list of dicts")
    if not isinstance(split_map, dict):
        raise AnnotationError(f"{source}: split: expected a dict of name -> list of frame_dirs")

    by_name: dict[str, Annotation] = {}
    for i, entry in enumerate(raw):
        ann = validate_entry(entry, len(class_names), kp_layout.num_joints, source, i)
        if ann.frame_dir in by_name:
            raise AnnotationError(f"{source}: clip {ann.frame_dir!r}: frame_dir: duplicated entry")
        by_name[ann.frame_dir] = ann

    splits: dict[str, list[Annotation]] = {}
    for name, members in split_map.items():
        if not isinstance(members, (list, tuple)):
            raise AnnotationError(f"{source}: split {name!r}: expected a list of frame_dirs")
        unknown = [m for m in members if m not in by_name]
        if unknown:
            raise AnnotationError(
                f"{source}: split {name!r}: {len(unknown)} frame_dir(s) without an annotation "
                f"entry, e.g. clip {unknown[0]!r}"
            )
        splits[str(name)] = [by_name[m] for m in members]

    return DatasetIndex(
        root=root,
        class_names=class_names,
        splits=splits,
        video_root=root / video_dir,
        video_ext=video_ext,
        layout=kp_layout,
        fingerprint=metadata.get("fingerprint"),
        metadata=metadata,
    )
