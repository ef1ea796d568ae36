import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mg_ray.data.annotations import (
    AnnotationError,
    RestrictedUnpickler,
    load_index,
    safe_load_pickle,
)

from .helpers import make_entry, write_dataset


@pytest.fixture
def root(tmp_path):
    return write_dataset(tmp_path / "ds", write_videos=False)


def rewrite(root: Path, mutate) -> Path:
    with open(root / "annotations.pkl", "rb") as f:
        data = pickle.load(f)  # our own trusted test file
    mutate(data)
    with open(root / "annotations.pkl", "wb") as f:
        pickle.dump(data, f)
    return root


def test_loads_index(root):
    index = load_index(root)
    assert index.class_names == ["class 0", "class 1", "class 2"]
    assert [len(index.split(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    assert index.layout.name == "coco17" and index.fingerprint == "test"
    ann = index.split("train")[0]
    assert ann.keypoint.dtype == np.float32 and ann.keypoint.shape[1:] == (20, 17, 2)
    assert ann.extra["subject"] == "s0"  # extra keys are tolerated and kept
    assert index.video_path(ann.frame_dir) == root / "videos" / f"{ann.frame_dir}.mp4"
    with pytest.raises(AnnotationError, match="no split named 'xsub_train'"):
        index.split("xsub_train")


def test_without_dataset_json_defaults_to_coco17(root):
    (root / "dataset.json").unlink()
    assert load_index(root).layout.name == "coco17"
    with pytest.raises(AnnotationError, match="expected V = 25 joints"):
        load_index(root, layout="body25")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    obj = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.float32(1.5),
        "i": np.int64(3),
        "t": (1, "x", None, True),
        "set": {1, 2},
        "d": np.dtype("f4"),
    }
    (tmp_path / "x.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    back = safe_load_pickle(tmp_path / "x.pkl")
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["s"] == 1.5 and back["t"] == obj["t"] and back["set"] == {1, 2}


def test_numpy1_module_names_resolve():
    import io

    unpickler = RestrictedUnpickler(io.BytesIO(b""))
    assert callable(unpickler.find_class("numpy.core.multiarray", "_reconstruct"))
    assert callable(unpickler.find_class("numpy._core.multiarray", "scalar"))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_is_refused_and_never_runs(root, tmp_path):
    marker = tmp_path / "pwned"
    rewrite(root, lambda d: d["annotations"][0].__setitem__("label", Payload(marker)))
    with pytest.raises(AnnotationError) as err:
        load_index(root)
    assert "annotations.pkl" in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate, field, message",
    [
        (lambda e: e.pop("keypoint_score"), "keypoint_score", "missing key"),
        (
            lambda e: e.__setitem__("keypoint_score", e["keypoint_score"][:, :-1]),
            "keypoint_score",
            "expected shape",
        ),
        (lambda e: e.__setitem__("keypoint", e["keypoint"][..., :1]), "keypoint", "expected shape"),
        (lambda e: e.__setitem__("total_frames", 99), "keypoint", "total_frames = 99"),
        (
            lambda e: e.__setitem__("keypoint", e["keypoint"][:, :, :5]),
            "keypoint",
            "expected V = 17",
        ),
        (lambda e: e["keypoint"].__setitem__((0, 3, 4, 0), np.nan), "keypoint", "NaN/inf"),
        (lambda e: e["keypoint"].__setitem__((0, 3, 4, 1), np.inf), "keypoint", "NaN/inf"),
        (lambda e: e.__setitem__("label", 3), "label", r"\[0, 3\)"),
        (
            lambda e: e.__setitem__("label", -2),
            "label",
            r"\[0, 3\) .*or -1 / none for an unlabeled clip",
        ),
        (lambda e: e.__setitem__("img_shape", (720,)), "img_shape", "height, width"),
        (lambda e: e.__setitem__("keypoint", e["keypoint"].tolist()), "keypoint", "numpy array"),
    ],
)
def test_bad_entries_name_file_clip_and_field(root, mutate, field, message):
    rewrite(root, lambda d: mutate(d["annotations"][2]))
    with pytest.raises(AnnotationError) as err:
        load_index(root)
    text = str(err.value)
    assert "annotations.pkl" in text and "clip 'clip002'" in text and f"{field}:" in text
    assert pytest.importorskip("re").search(message, text), text


def test_split_with_unknown_clip(root):
    rewrite(root, lambda d: d["split"]["val"].append("ghost"))
    with pytest.raises(AnnotationError, match="split 'val'.*'ghost'"):
        load_index(root)


def test_duplicate_and_structure_errors(root):
    rewrite(root, lambda d: d["annotations"].append(make_entry("clip000", 0, 20, 64, 96)))
    with pytest.raises(AnnotationError, match="clip 'clip000': frame_dir: duplicated"):
        load_index(root)
    (root / "annotations.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(AnnotationError, match="'split' and 'annotations'"):
        load_index(root)
    (root / "annotations.pkl").write_bytes(b"garbage")
    with pytest.raises(AnnotationError, match="not a readable annotation pickle"):
        load_index(root)


def test_missing_files(root, tmp_path):
    with pytest.raises(AnnotationError, match="dataset folder not found"):
        load_index(tmp_path / "nope")
    (root / "classes.txt").unlink()
    with pytest.raises(AnnotationError, match="classes.txt: class list not found"):
        load_index(root)
