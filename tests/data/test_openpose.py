"""`mg-ray convert-openpose` on a tiny fabricated OpenPose tree."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from mg_ray import cli
from mg_ray.data import openpose, video_io

FRAMES = 5
CLASSES = ["touch face", "rub hands", "sit straight"]


def _person(rng: np.random.Generator, hands: bool = True) -> dict:
    pose = np.c_[rng.uniform(0, 64, (25, 2)), rng.uniform(0.1, 1, 25)]
    pose[3] = 0  # one undetected joint, as OpenPose writes it
    person = {"pose_keypoints_2d": pose.ravel().tolist(), "face_keypoints_2d": [0.0] * 210}
    if hands:
        person["hand_left_keypoints_2d"] = (
            np.c_[rng.uniform(0, 64, (21, 2)), np.full(21, 0.5)].ravel().tolist()
        )
        person["hand_right_keypoints_2d"] = (
            np.c_[rng.uniform(0, 64, (21, 2)), np.full(21, 0.7)].ravel().tolist()
        )
    else:
        person["hand_left_keypoints_2d"] = []
        person["hand_right_keypoints_2d"] = []
    return person


def _write_frame(folder: Path, clip: str, index: int, frame: dict | str) -> Path:
    path = folder / f"{clip}_{index:012d}_keypoints.json"
    path.write_text(
        frame if isinstance(frame, str) else json.dumps({"version": 1.3, "people": frame["people"]})
    )
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """3 clips x 5 frames of 64x48 video; clip b has an empty frame 2 and a second, weaker person."""
    rng = np.random.default_rng(0)
    root = tmp_path / "openpose"
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.zeros((FRAMES, 48, 64, 3), np.uint8)
    for clip in ("a", "b", "c"):
        folder = root / clip
        folder.mkdir(parents=True)
        for i in range(FRAMES):
            people = [_person(rng, hands=clip != "c")]
            if clip == "b" and i == 2:
                people = []
            if clip == "b" and i == 3:
                weak = _person(rng)
                weak["pose_keypoints_2d"] = (
                    (np.array(weak["pose_keypoints_2d"]).reshape(25, 3) * [1, 1, 0.01])
                    .ravel()
                    .tolist()
                )
                people = [weak] + people  # listed first, but less confident
            _write_frame(folder, clip, i, {"people": people})
        video_io.write_video(videos / f"{clip}.mp4", frames)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("clip,label,subject,split\na,0,p1,train\nb,rub hands,p2,val\nc,2,p3,test\n")
    return {
        "openpose": root,
        "videos": videos,
        "classes": classes,
        "labels": labels,
        "tmp": tmp_path,
    }


def _convert(tree: dict[str, Path], out: str = "ds", **kwargs) -> Path:
    return openpose.convert(
        tree["openpose"],
        tree["labels"],
        tree["videos"],
        tree["tmp"] / out,
        tree["classes"],
        log=lambda *_: None,
        **kwargs,
    )


def _load(folder: Path) -> dict:
    with open(folder / "annotations.pkl", "rb") as f:  # written by the code under test
        return pickle.load(f)


def _raw(tree, clip: str, index: int) -> list[dict]:
    return json.loads(
        (tree["openpose"] / clip / f"{clip}_{index:012d}_keypoints.json").read_text()
    )["people"]


def test_body25_conversion(tree):
    out = _convert(tree)
    data = _load(out)
    assert data["split"] == {"train": ["a"], "val": ["b"], "test": ["c"]}
    by_name = {a["frame_dir"]: a for a in data["annotations"]}
    assert [by_name[c]["label"] for c in "abc"] == [0, 1, 2]
    a = by_name["a"]
    assert a["img_shape"] == a["original_shape"] == (48, 64) and a["total_frames"] == FRAMES
    assert a["subject"] == "p1"
    assert a["keypoint"].shape == (1, FRAMES, 25, 2) and a["keypoint"].dtype == np.float32
    assert a["keypoint_score"].shape == (1, FRAMES, 25) and a["keypoint_score"].dtype == np.float32
    raw = np.array(_raw(tree, "a", 1)[0]["pose_keypoints_2d"], np.float32).reshape(25, 3)
    np.testing.assert_array_equal(a["keypoint"][0, 1], raw[:, :2])
    np.testing.assert_array_equal(a["keypoint_score"][0, 1], raw[:, 2])
    assert a["keypoint_score"][0, :, 3].max() == 0 and (a["keypoint"][0, :, 3] == 0).all()
    b = by_name["b"]
    assert (b["keypoint"][0, 2] == 0).all() and (
        b["keypoint_score"][0, 2] == 0
    ).all()  # nobody there
    strong = np.array(_raw(tree, "b", 3)[1]["pose_keypoints_2d"], np.float32).reshape(25, 3)
    np.testing.assert_array_equal(b["keypoint"][0, 3], strong[:, :2])  # most confident person kept
    assert (out / "videos" / "a.mp4").is_symlink()
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["layout"] == "body25" and meta["num_classes"] == 3
    assert meta["fingerprint"] == video_io.fingerprint(out)
    assert (out / "classes.txt").read_text().splitlines() == CLASSES


def test_body25_hands_layout_and_copy(tree):
    out = _convert(tree, layout="body25_hands", copy=True, max_people=2)
    by_name = {a["frame_dir"]: a for a in _load(out)["annotations"]}
    a, c = by_name["a"], by_name["c"]
    assert a["keypoint"].shape == (2, FRAMES, 67, 2)
    person = _raw(tree, "a", 0)[0]
    left = np.array(person["hand_left_keypoints_2d"], np.float32).reshape(21, 3)
    right = np.array(person["hand_right_keypoints_2d"], np.float32).reshape(21, 3)
    np.testing.assert_array_equal(a["keypoint"][0, 0, 25:46], left[:, :2])
    np.testing.assert_array_equal(a["keypoint"][0, 0, 46:67], right[:, :2])
    assert (a["keypoint_score"][1] == 0).all()  # only one person in clip a
    assert (c["keypoint_score"][0, :, 25:] == 0).all()  # no hands detected in clip c
    assert by_name["b"]["keypoint_score"][1, 3].max() > 0  # the weak second person in b, frame 3
    video = out / "videos" / "a.mp4"
    assert not video.is_symlink() and video.read_bytes() == (tree["videos"] / "a.mp4").read_bytes()


def test_split_file_overrides_and_missing_split_is_an_error(tree):
    split_file = tree["tmp"] / "split.csv"
    split_file.write_text("clip,split\na,train\nb,train\nc,test\n")
    assert _load(_convert(tree, split_file=split_file))["split"] == {
        "train": ["a", "b"],
        "test": ["c"],
    }
    tree["labels"].write_text("clip,label\na,0\nb,1\nc,2\n")
    with pytest.raises(openpose.ConvertError, match="clip 'a': no split given"):
        _convert(tree, out="ds2")


def test_malformed_json_names_the_file(tree):
    bad = _write_frame(tree["openpose"] / "b", "b", 1, '{"people": [')
    with pytest.raises(openpose.ConvertError, match=f"{bad}: malformed JSON"):
        _convert(tree)
    assert not (tree["tmp"] / "ds").exists()


def test_wrong_keypoint_count_names_the_file_and_field(tree):
    bad = _write_frame(
        tree["openpose"] / "c",
        "c",
        0,
        json.dumps({"people": [{"pose_keypoints_2d": [1.0, 2.0, 0.5] * 18}]}),
    )
    with pytest.raises(
        openpose.ConvertError, match=rf"{bad}: people\[0\].pose_keypoints_2d: expected 75 numbers"
    ):
        _convert(tree)


def test_missing_clip_folder_and_video_name_the_clip(tree):
    with open(tree["labels"], "a") as f:
        f.write("d,0,p4,train\n")
    with pytest.raises(openpose.ConvertError, match="clip 'd': OpenPose folder not found"):
        _convert(tree)
    (tree["openpose"] / "d").mkdir()
    with pytest.raises(openpose.ConvertError, match="clip 'd': video not found"):
        _convert(tree)


def test_unknown_label_names_the_line(tree):
    tree["labels"].write_text("clip,label,split\na,0,train\nb,wave hello,val\n")
    with pytest.raises(
        openpose.ConvertError, match=r"labels.csv:3: clip 'b': unknown label 'wave hello'"
    ):
        _convert(tree)
    tree["labels"].write_text("clip,label,split\na,3,train\n")
    with pytest.raises(openpose.ConvertError, match=r"labels.csv:2: clip 'a': unknown label '3'"):
        _convert(tree)


def test_keypoints_longer_than_video_are_cut(tree):
    _write_frame(
        tree["openpose"] / "a", "a", FRAMES + 2, {"people": [_person(np.random.default_rng(1))]}
    )
    a = next(x for x in _load(_convert(tree))["annotations"] if x["frame_dir"] == "a")
    assert a["total_frames"] == FRAMES and a["keypoint"].shape[1] == FRAMES


def test_existing_folder_is_not_overwritten(tree):
    (tree["tmp"] / "ds").mkdir()
    (tree["tmp"] / "ds" / "keep.txt").write_text("mine")
    with pytest.raises(video_io.DatasetWriteError, match="not empty"):
        _convert(tree)
    with pytest.raises(video_io.DatasetWriteError, match="not an mg-ray dataset"):
        _convert(tree, force=True)


def test_cli(tree, capsys):
    argv = [
        "convert-openpose",
        "--openpose-dir",
        str(tree["openpose"]),
        "--labels",
        str(tree["labels"]),
        "--classes",
        str(tree["classes"]),
        "--videos",
        str(tree["videos"]),
        "--out",
        str(tree["tmp"] / "cli"),
    ]
    assert cli.main(argv) == 0
    assert "3 clips, 3 classes, layout body25" in capsys.readouterr().out
    assert cli.main(argv) == 2
    assert "--force" in capsys.readouterr().err
