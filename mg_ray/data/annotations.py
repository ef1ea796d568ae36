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

import codecs
import collections
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mg_ray.data.layouts import COCO17, LAYOUTS, KeypointLayout, get_layout, layout_for_joints

if TYPE_CHECKING:
    from mg_ray.data.config import DataConfig


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
    for name in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "bool",
        "complex",
        "slice",
    )
}


def _builtin_globals() -> dict[tuple[str, str], Any]:
    allowed = {}
    for module in ("builtins", "__builtin__"):  # "__builtin__": protocol 0-2 pickles from Python 2
        for name, obj in _BUILTINS.items():
            allowed[(module, name)] = obj
    # Protocol 0-2 pickles store bytes (e.g. an array's buffer) as _codecs.encode(str, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


class _NdarrayClass:
    """Stands for `numpy.ndarray` in a pickle: accepted only as the class argument of
    `_reconstruct`, so a pickle cannot call `ndarray(shape)` to allocate what it likes."""

    def __new__(cls, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "numpy.ndarray called directly; an array pickle only passes it to _reconstruct"
        )


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an allow-list of globals (containers, numbers, strings,
    numpy arrays); anything else raises `AnnotationError` before it can be called.

    Nothing it admits can allocate far more than the file holds: `bytes(n)` / `bytearray(n)` and
    an array reconstructed with a non-empty shape are refused beyond `max_alloc` bytes (default:
    64 MiB plus 16 times the file's size), and `numpy.ndarray` cannot be called at all (array
    pickles only pass it to `_reconstruct`, whose data then comes from the file)."""

    def __init__(
        self, file: io.BufferedIOBase, source: str = "<pickle>", max_alloc: int | None = None
    ) -> None:
        super().__init__(file)
        self.source = source
        if max_alloc is None:
            try:
                max_alloc = 64 * 2**20 + 16 * Path(source).stat().st_size
            except OSError:
                max_alloc = 64 * 2**20
        self.max_alloc = max_alloc
        self.allowed = {**_builtin_globals(), **_numpy_globals()}
        for module in ("builtins", "__builtin__"):
            self.allowed[(module, "bytes")] = self._sized(bytes)
            self.allowed[(module, "bytearray")] = self._sized(bytearray)
        self.allowed[("numpy", "ndarray")] = _NdarrayClass
        for key, value in list(self.allowed.items()):
            if key[1] == "_reconstruct":
                self.allowed[key] = self._reconstruct(value)

    def _refuse(self, what: str, size: int) -> AnnotationError:
        return AnnotationError(
            f"{self.source}: the pickle asks for {what} of {size:,} bytes, more than a file of "
            f"this size can hold (limit {self.max_alloc:,}); refused"
        )

    def _sized(self, kind: type) -> Any:
        def make(*args: Any) -> Any:
            if (
                args
                and isinstance(args[0], int)
                and not isinstance(args[0], bool)
                and args[0] > self.max_alloc
            ):
                raise self._refuse(f"{kind.__name__}({args[0]})", args[0])
            return kind(*args)

        return make

    def _reconstruct(self, original: Any) -> Any:
        def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
            if subtype is not _NdarrayClass:
                raise AnnotationError(
                    f"{self.source}: _reconstruct of {subtype!r}: only numpy arrays are admitted"
                )
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if size > self.max_alloc:
                raise self._refuse(f"an array of shape {tuple(shape)}", size)
            return original(np.ndarray, shape, dtype)

        return reconstruct

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


UNLABELED = -1  # the label of a clip released without one (a challenge's test split)
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


def frame_dir_is_confined(frame_dir: str) -> bool:
    """True when `frame_dir` names a path inside the folder it is joined to: relative, with no
    '..', '.' or empty part (either slash), no drive."""
    parts = frame_dir.replace("\\", "/").split("/")
    return not (
        frame_dir.startswith(("/", "\\"))
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts)
    )


def validate_entry(
    entry: Any, num_classes: int, num_joints: int, source: str, position: int
) -> Annotation:
    """Check one raw annotation dict and return it as an `Annotation`.

    Raises `AnnotationError` naming `source`, the entry's frame_dir (or its position when that
    is missing) and the field.
    """
    if not isinstance(entry, dict):
        raise AnnotationError(
            f"{source}: annotations[{position}]: expected a dict, got {type(entry).__name__}"
        )
    frame_dir = entry.get("frame_dir")
    where = (
        f"{source}: clip {frame_dir!r}"
        if isinstance(frame_dir, str)
        else f"{source}: annotations[{position}]"
    )

    def fail(key: str, message: str) -> AnnotationError:
        return AnnotationError(f"{where}: {key}: {message}")

    for key in REQUIRED_KEYS:
        if key not in entry and key != "label":
            raise fail(key, "missing key")
    if not isinstance(frame_dir, str) or not frame_dir:
        raise fail("frame_dir", f"expected a non-empty string, got {frame_dir!r}")
    if not frame_dir_is_confined(frame_dir):
        raise fail(
            "frame_dir",
            f"expected a relative name inside the dataset (no '..', no absolute path), "
            f"got {frame_dir!r}",
        )

    label = entry.get("label", UNLABELED)  # a test split released without labels (MiGA)
    label = UNLABELED if label is None else label
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise fail("label", f"expected an integer, got {label!r}")
    if int(label) != UNLABELED and not 0 <= int(label) < num_classes:
        raise fail(
            "label",
            f"expected a class id in [0, {num_classes}) (classes.txt), or -1 / none for an "
            f"unlabeled clip, got {int(label)}",
        )

    img_shape = entry["img_shape"]
    if (
        not isinstance(img_shape, (tuple, list, np.ndarray))
        or len(img_shape) != 2
        or not all(isinstance(v, (int, np.integer)) and v > 0 for v in img_shape)
    ):
        raise fail("img_shape", f"expected (height, width) positive integers, got {img_shape!r}")

    total_frames = entry["total_frames"]
    if (
        isinstance(total_frames, bool)
        or not isinstance(total_frames, (int, np.integer))
        or total_frames < 1
    ):
        raise fail("total_frames", f"expected an integer >= 1, got {total_frames!r}")

    keypoint, score = entry["keypoint"], entry["keypoint_score"]
    for key, arr in (("keypoint", keypoint), ("keypoint_score", score)):
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            raise fail(
                key,
                f"expected a numeric numpy array, got {type(arr).__name__}"
                + (f" of dtype {arr.dtype}" if isinstance(arr, np.ndarray) else ""),
            )
    if keypoint.ndim != 4 or keypoint.shape[-1] != 2:
        raise fail("keypoint", f"expected shape [M, T, V, 2], got {list(keypoint.shape)}")
    m, t, v, _ = keypoint.shape
    if v != num_joints:
        raise fail(
            "keypoint", f"expected V = {num_joints} joints (the dataset's keypoint layout), got {v}"
        )
    if score.shape != (m, t, v):
        raise fail(
            "keypoint_score",
            f"expected shape [M, T, V] = {[m, t, v]} (as keypoint), got {list(score.shape)}",
        )
    if t != int(total_frames):
        raise fail("keypoint", f"expected T = total_frames = {int(total_frames)} frames, got {t}")
    if not np.isfinite(keypoint).all():
        bad = np.argwhere(~np.isfinite(keypoint))[0]
        raise fail(
            "keypoint",
            f"contains NaN/inf (first at person {bad[0]}, frame {bad[1]}, joint {bad[2]})",
        )
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


# What `DatasetIndex.video_path` adds to a frame_dir for each way a dataset keeps its frames:
# H.264 clips, or a frame store (`mg-ray prepare --store`) of JPEG folders or .npy arrays.
STORE_EXTENSIONS = {"video": ".mp4", "jpeg": "", "uint8": ".npy"}


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

    def labeled(self, name: str) -> list[Annotation]:
        """Split `name`, which training and evaluation need fully labeled: an error names the
        first unlabeled clip otherwise."""
        clips = self.split(name)
        unlabeled = [a.frame_dir for a in clips if a.label == UNLABELED]
        if unlabeled:
            raise AnnotationError(
                f"{self.root}: split {name!r}: {len(unlabeled)} of {len(clips)} clips carry no label (e.g. clip "
                f"{unlabeled[0]!r}); an unlabeled split can be predicted (mg-ray predict --split), not trained "
                f"or evaluated on"
            )
        return clips

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
        raise AnnotationError(
            f"{path}: class list not found (one class name per line, in id order)"
        )
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

    The annotations are `annotation_file` or, when the folder has none, one pickle per split
    (`train.pkl`, `val.pkl`, `test.pkl`, ...: the MiGA releases), each with its own `split` dict.
    `layout`: keypoint layout name; None takes dataset.json's "layout", else the one layout with
    the annotations' joint count (`layouts.layout_for_joints`). A frame store's `dataset.json`
    (`frame_store`) puts its folder and kind in place of `video_dir` and `video_ext`. Does not
    open any video (that happens per item, in the loader's workers).
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
    named, named_by = (
        (layout, "layout") if layout else (metadata.get("layout"), f"{meta_path}: layout")
    )
    try:
        named_layout = get_layout(named) if named else None
    except ValueError as err:
        raise AnnotationError(f"{named_by}: {err}") from None

    class_names = read_class_names(root / "classes.txt")
    files = annotation_files(root, annotation_file)
    loaded = [(str(path), *read_annotation_file(path)) for path in files]
    kp_layout = resolve_layout(named_layout, named_by, loaded)

    by_name: dict[str, Annotation] = {}
    where: dict[str, str] = {}
    splits: dict[str, list[Annotation]] = {}
    for source, raw, split_map in loaded:
        for i, entry in enumerate(raw):
            ann = validate_entry(entry, len(class_names), kp_layout.num_joints, source, i)
            if ann.frame_dir in by_name:
                also = (
                    "" if where[ann.frame_dir] == source else f" (also in {where[ann.frame_dir]})"
                )
                raise AnnotationError(
                    f"{source}: clip {ann.frame_dir!r}: frame_dir: duplicated entry{also}"
                )
            by_name[ann.frame_dir], where[ann.frame_dir] = ann, source
        for name, members in split_map.items():
            if not isinstance(members, (list, tuple)):
                raise AnnotationError(f"{source}: split {name!r}: expected a list of frame_dirs")
            unknown = [m for m in members if m not in by_name or where[m] != source]
            if unknown:
                raise AnnotationError(
                    f"{source}: split {name!r}: {len(unknown)} frame_dir(s) without an annotation "
                    f"entry in this file, e.g. clip {unknown[0]!r}"
                )
            if str(name) in splits:
                raise AnnotationError(
                    f"{source}: split {name!r}: also defined by another annotation file"
                )
            splits[str(name)] = [by_name[m] for m in members]

    store = metadata.get("frame_store")
    if store:  # a frame store (`mg-ray prepare --store`): its clips are read from there
        formats = {k: v for k, v in STORE_EXTENSIONS.items() if k != "video"}
        if not isinstance(store, dict) or store.get("format") not in formats:
            raise AnnotationError(
                f"{meta_path}: frame_store: expected {{'format': 'jpeg' or 'uint8', 'folder': "
                f"...}}, got {store!r}"
            )
        video_dir, video_ext = str(store.get("folder", "frames")), formats[store["format"]]
    check_confined(root / video_dir, by_name, where)
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


def index_for(cfg: DataConfig) -> DatasetIndex:
    """The index of the dataset `cfg` (a `DataConfig`) names: its folder, annotation file, clip
    folder and layout (`DataConfig.index_source`)."""
    return load_index(
        cfg.root,
        layout=cfg.layout,
        annotation_file=cfg.annotation_file,
        video_dir=cfg.video_dir,
        video_ext=cfg.video_ext,
    )


def check_confined(video_root: Path, clips: dict[str, Annotation], where: dict[str, str]) -> None:
    """Every clip's folder (`frame_dir` may hold subfolders) resolves inside `video_root`: a
    symlinked folder cannot lead reads (or `mg-ray prepare`'s writes) out of the dataset. The
    clip file itself may be a symlink: `mg-ray convert-openpose` links the user's videos."""
    if not video_root.is_dir():
        return
    base = video_root.resolve()
    for frame_dir in {name.rsplit("/", 1)[0] for name in clips if "/" in name}:
        folder = (video_root / frame_dir).resolve()
        if not folder.is_relative_to(base):
            raise AnnotationError(
                f"{where[next(n for n in clips if n.startswith(frame_dir + '/'))]}: clip folder "
                f"{frame_dir!r}: resolves to {folder}, outside {base}"
            )


def annotation_files(root: Path, annotation_file: str = "annotations.pkl") -> list[Path]:
    """`annotation_file`, or else every `<split>.pkl` of the folder (one pickle per split)."""
    single = root / annotation_file
    if single.is_file():
        return [single]
    per_split = sorted(p for p in root.glob("*.pkl") if p.is_file())
    if not per_split:
        raise AnnotationError(
            f"{single}: annotation file not found (nor any per-split <split>.pkl in {root})"
        )
    return per_split


def read_annotation_file(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """(entries, split map) of one annotation pickle, read through the restricted unpickler."""
    data = safe_load_pickle(path)
    if not isinstance(data, dict) or "annotations" not in data or "split" not in data:
        raise AnnotationError(f"{path}: expected a dict with keys 'split' and 'annotations'")
    raw, split_map = data["annotations"], data["split"]
    if not isinstance(raw, list):
        raise AnnotationError(f"{path}: annotations: expected a list of dicts")
    if not isinstance(split_map, dict):
        raise AnnotationError(f"{path}: split: expected a dict of name -> list of frame_dirs")
    return raw, split_map


def resolve_layout(
    named: KeypointLayout | None, named_by: str, loaded: list[tuple[str, list[Any], dict[str, Any]]]
) -> KeypointLayout:
    """The named layout, checked against the annotations' joint count V, or the layout V
    identifies. A mismatch names both."""
    found = next(
        (
            (source, entry["keypoint"].shape[2])
            for source, raw, _ in loaded
            for entry in raw
            if isinstance(entry, dict)
            and isinstance(entry.get("keypoint"), np.ndarray)
            and entry["keypoint"].ndim == 4
        ),
        None,
    )
    if named is not None:
        if found is not None and found[1] != named.num_joints:
            raise AnnotationError(
                f"{found[0]}: keypoint: expected V = {named.num_joints} joints (layout {named.name}, from "
                f"{named_by}), got {found[1]}" + _layout_hint(found[1])
            )
        return named
    if found is None:
        return COCO17
    by_count = layout_for_joints(found[1])
    if by_count is None:
        raise AnnotationError(
            f"{found[0]}: keypoint: V = {found[1]} joints matches no known layout "
            f"({', '.join(f'{l.name} {l.num_joints}' for l in LAYOUTS.values())}); "
            f"name one in dataset.json's 'layout'"
        )
    return by_count


def _layout_hint(num_joints: int) -> str:
    other = layout_for_joints(num_joints)
    return f" (which is layout {other.name})" if other else ""
