"""The real iMiGUE formats, built in the test from the public recipes (REFERENCE.md section 1):
the MiGA 22-joint per-split pickles, the organisers' raw release, unlabeled test splits, OpenPose
1.0/1.1 and COCO-18 output, and bad input confined."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from mg_ray import cli
from mg_ray.data import imigue, openpose, video_io
from mg_ray.data.annotations import UNLABELED, AnnotationError, load_index, safe_load_pickle
from mg_ray.data.layouts import COCO18, IMIGUE22, IMIGUE35, LAYOUTS, layout_for_joints

CLASSES = imigue.default_classes()


def test_layouts_are_data_and_joint_counts_identify_them():
    assert len(CLASSES) == 32 and CLASSES[0] == "turtle neck" and CLASSES[31] == "illustrative"
    assert (
        IMIGUE22.joints[:2] == ("Nose", "ShoulderCenter") and IMIGUE22.joints[-1] == "LeftFinger5"
    )
    assert IMIGUE22.joints == tuple(IMIGUE35.joints[i] for i in imigue.IMIGUE22_FROM_35)
    # the organisers' drawing: ShoulderCenter-Nose, shoulders, arms, face, each hand to its fingers
    named = {(IMIGUE22.joints[a], IMIGUE22.joints[b]) for a, b in IMIGUE22.limbs}
    assert {
        ("ShoulderCenter", "Nose"),
        ("ElbowRight", "HandRight"),
        ("EyeLeft", "EarLeft"),
        ("HandLeft", "LeftFinger3"),
        ("HandRight", "RightFinger5"),
    } <= named
    assert len(IMIGUE22.limbs) == 21 and len(IMIGUE22.left) == 10
    flip = IMIGUE22.flip_permutation()
    assert IMIGUE22.joints[flip[IMIGUE22.joints.index("HandLeft")]] == "HandRight"
    assert {n: layout_for_joints(LAYOUTS[n].num_joints).name for n in LAYOUTS} == {
        n: n for n in LAYOUTS
    }
    assert COCO18.joints[1] == "neck" and layout_for_joints(19) is None


def miga_entry(name: str, label: int | None, rng, frames: int = 90) -> dict:
    """One clip as the MiGA 2023 winners' readlabel.py writes it: V = 22, T = 90, M = 1, 1080p."""
    entry = {
        "frame_dir": name,
        "img_shape": (1080, 1920),
        "original_shape": (1080, 1920),
        "total_frames": frames,
        "keypoint": (rng.uniform(600, 1300, (1, frames, 22, 2))).astype(np.float32),
        "keypoint_score": rng.uniform(0.3, 1.0, (1, frames, 22)).astype(np.float32),
    }
    if label is not None:
        entry["label"] = label
    return entry


@pytest.fixture()
def miga(tmp_path) -> Path:
    """A MiGA-style dataset: train.pkl / val.pkl / test.pkl (test unlabeled), no videos."""
    rng = np.random.default_rng(0)
    root = tmp_path / "miga"
    root.mkdir()
    for split, count, labeled in (("train", 8, True), ("val", 4, True), ("test", 3, False)):
        names = [f"{i:04d}_{split[:2]}" for i in range(count)]
        entries = [miga_entry(n, (i % 4) if labeled else None, rng) for i, n in enumerate(names)]
        with open(root / f"{split}.pkl", "wb") as f:
            pickle.dump({"split": {split: names}, "annotations": entries}, f)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def test_miga_per_split_pickles_load_with_the_22_joint_layout(miga, capsys):
    index = load_index(miga)
    assert index.layout is IMIGUE22  # recognised from V = 22
    assert {k: len(v) for k, v in index.splits.items()} == {"test": 3, "train": 8, "val": 4}
    assert all(a.label == UNLABELED for a in index.split("test"))
    with pytest.raises(AnnotationError, match="split 'test': 3 of 3 clips carry no label"):
        index.labeled("test")
    (miga / "dataset.json").write_text(json.dumps({"layout": "coco17"}))
    with pytest.raises(
        AnnotationError,
        match=r"expected V = 17 joints \(layout coco17, from .*dataset.json.*got 22 "
        r"\(which is layout imigue22\)",
    ):
        load_index(miga)
    (miga / "dataset.json").unlink()
    assert cli.main(["check-data", str(miga)]) == 0
    out = capsys.readouterr().out
    assert "layout: imigue22 (22 joints)" in out and "split test: 3 clips, 3 unlabeled" in out
    assert "skeleton-only" in out and "usable" in out


def test_a_skeleton_only_dataset_is_refused_for_rgb_models_and_an_unlabeled_test_split_named(miga):
    from mg_ray.data.check import ensure_dataset
    from mg_ray.data.config import DataConfig

    cfg = DataConfig(root=str(miga), rgb_size=64, heatmap_size=16)
    with pytest.raises(
        AnnotationError, match="data.test_split: .*carry no label.*test_split: null"
    ):
        ensure_dataset(cfg, rgb=False)
    cfg = DataConfig(root=str(miga), rgb_size=64, heatmap_size=16, test_split=None)
    ensure_dataset(cfg, rgb=False)
    with pytest.raises(AnnotationError, match="no video folder: this dataset is skeleton-only"):
        ensure_dataset(cfg, rgb=True)
    # an index loaded before (a pipeline's earlier stage) is checked again for this config
    index = ensure_dataset(cfg, rgb=False)
    assert ensure_dataset(cfg, rgb=False, index=index) is index
    with pytest.raises(AnnotationError, match="data.test_split: .*carry no label"):
        ensure_dataset(DataConfig(root=str(miga)), rgb=False, index=index)


def test_per_split_pickles_have_a_fingerprint(miga):
    """MiGA's folders (no annotations.pkl, no dataset.json) are fingerprinted like the others:
    registered versions compare their datasets by it, and "unknown" never matches."""
    first = video_io.dataset_fingerprint(miga)
    assert first not in ("", "unknown") and first == video_io.dataset_fingerprint(miga)
    (miga / "val.pkl").rename(miga / "val2.pkl")  # the same bytes under another split name
    assert video_io.dataset_fingerprint(miga) != first


def raw_release(tmp_path: Path, videos: bool) -> dict[str, Path]:
    """Two interview videos as the organisers release them: <id>/<id>_light_hand.csv (a frame
    column, then 35 x (x, y, c)) and <id>/<id>_label.csv (gestureID,start,end), one label 99."""
    rng = np.random.default_rng(1)
    src = tmp_path / "raw"
    long_videos = tmp_path / "long"
    long_videos.mkdir()
    gestures = {"0187": [(3, 2, 11), (99, 14, 25), (17, 30, 41)], "0204": [(5, 0, 9), (3, 12, 23)]}
    for vid, rows in gestures.items():
        folder = src / vid
        folder.mkdir(parents=True)
        frames = 48
        joints = np.c_[
            rng.uniform(0, 64, (frames * 35, 2)), rng.uniform(0.2, 1, frames * 35)
        ].reshape(frames, 105)
        joints[:, 3 * 20 + 2] = 0  # an undetected joint (SmallToeLeft)
        lines = [",".join([str(t)] + [f"{v:.3f}" for v in row]) for t, row in enumerate(joints)]
        (folder / f"{vid}_light_hand.csv").write_text("\n".join(lines) + "\n")
        (folder / f"{vid}_label.csv").write_text("".join(f"{g},{s},{e}\n" for g, s, e in rows))
        if videos:
            images = rng.integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8)
            video_io.write_video(long_videos / f"{vid}.mp4", images)
    split = tmp_path / "split.csv"
    split.write_text("video_id,split,subject\n0187,train,p1\n0204,val,p2\n")
    return {"src": src, "videos": long_videos, "split": split, "tmp": tmp_path}


def test_raw_release_converts_with_the_organisers_rules(tmp_path):
    raw = raw_release(tmp_path, videos=True)
    out = imigue.convert(
        raw["src"], tmp_path / "ds", raw["split"], videos=raw["videos"], log=lambda *_: None
    )
    index = load_index(out)
    assert index.layout is IMIGUE22
    assert [a.frame_dir for a in index.split("train")] == ["0187_0", "0187_1", "0187_2"]
    assert [a.label for a in index.split("train")] == [
        2,
        31,
        16,
    ]  # 3 -> 2, 99 -> 32 -> 31, 17 -> 16
    first = index.split("train")[0]
    assert (
        first.total_frames == 10
        and first.keypoint.shape == (1, 10, 22, 2)
        and first.extra["subject"] == "p1"
    )
    values = np.loadtxt(raw["src"] / "0187" / "0187_light_hand.csv", delimiter=",")[:, 1:].reshape(
        48, 35, 3
    )
    np.testing.assert_allclose(
        first.keypoint[0], values[2:12][:, list(imigue.IMIGUE22_FROM_35), :2], atol=1e-3
    )
    from mg_ray.data.video import read_frames  # decord, as training reads them

    first_clip = read_frames(index.video_path("0187_0"), np.array([0, 9]))
    assert first_clip.num_frames == 10 and first_clip.frames.shape == (2, 48, 64, 3)
    assert read_frames(index.video_path("0204_1"), np.arange(12)).num_frames == 12
    kept = imigue.convert(
        raw["src"], tmp_path / "all", raw["split"], layout="imigue35", log=lambda *_: None
    )
    all35 = load_index(kept)
    assert all35.layout is IMIGUE35 and not (kept / "videos").exists()
    assert (all35.split("val")[0].keypoint_score[0, :, 20] == 0).all()  # undetected stays score 0
    with pytest.raises(
        video_io.DatasetWriteError if hasattr(video_io, "DatasetWriteError") else Exception
    ):
        imigue.convert(
            raw["src"], tmp_path / "ds", raw["split"], log=lambda *_: None
        )  # exists, no --force


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda raw: (raw["src"] / "0187" / "0187_label.csv").write_text("3,2,11\n40,30,60\n"),
            r"0187_label.csv:2: gestureID 40",
        ),
        (
            lambda raw: (raw["src"] / "0187" / "0187_label.csv").write_text("3,2,99\n"),
            r"0187_label.csv:1: frames 2..99",
        ),
        (
            lambda raw: (raw["src"] / "0204" / "0204_light_hand.csv").write_text("0,1,2\n"),
            r"0204_light_hand.csv:1: expected 106 values",
        ),
        (
            lambda raw: raw["split"].write_text("0187,train\n"),
            r"split.csv: no split for video\(s\) \['0204'\]",
        ),
    ],
)
def test_raw_release_errors_name_file_and_line(tmp_path, mutate, message):
    raw = raw_release(tmp_path, videos=False)
    mutate(raw)
    with pytest.raises(imigue.ImigueError, match=message):
        imigue.convert(raw["src"], tmp_path / "ds", raw["split"], log=lambda *_: None)
    assert not (tmp_path / "ds").exists()


def _openpose_tree(tmp_path: Path, key: str, joints: int) -> dict[str, Path]:
    rng = np.random.default_rng(2)
    root, videos = tmp_path / "op", tmp_path / "vids"
    videos.mkdir()
    for clip in ("a", "b"):
        (root / clip).mkdir(parents=True)
        for i in range(4):
            pose = (
                np.c_[rng.uniform(5, 60, (joints, 2)), rng.uniform(0.2, 1, joints)].ravel().tolist()
            )
            person = {key: pose}
            (root / clip / f"{clip}_{i:012d}_keypoints.json").write_text(
                json.dumps({"version": 1.1, "people": [person]})
            )
        video_io.write_video(videos / f"{clip}.mp4", np.zeros((4, 48, 64, 3), np.uint8))
    (tmp_path / "classes.txt").write_text("x\ny\n")
    (tmp_path / "labels.csv").write_text("clip,label,split\na,0,train\nb,1,val\n")
    return {"openpose": root, "videos": videos, "tmp": tmp_path}


@pytest.mark.parametrize(
    "key, layout, joints",
    [
        ("pose_keypoints", "body25", 25),
        ("pose_keypoints_2d", "coco18", 18),
        ("pose_keypoints", "coco18", 18),
    ],
)
def test_openpose_1_1_and_coco18_convert(tmp_path, key, layout, joints):
    tree = _openpose_tree(tmp_path, key, joints)
    out = openpose.convert(
        tree["openpose"],
        tmp_path / "labels.csv",
        tree["videos"],
        tmp_path / "ds",
        tmp_path / "classes.txt",
        layout=layout,
        log=lambda *_: None,
    )
    index = load_index(out)
    assert index.layout.name == layout and index.split("train")[0].keypoint.shape == (
        1,
        4,
        joints,
        2,
    )
    assert index.split("train")[0].keypoint_score.min() > 0  # the values were read, not zeros


def test_openpose_without_known_keys_is_an_error_and_normalised_coordinates_warn(tmp_path):
    tree = _openpose_tree(tmp_path, "pose_keypoints_3d", 25)
    with pytest.raises(
        openpose.ConvertError,
        match=r"a_00000000000\d_keypoints.json: people\[0\]: none of the keys "
        r"pose_keypoints_2d / pose_keypoints",
    ):
        openpose.convert(
            tree["openpose"],
            tmp_path / "labels.csv",
            tree["videos"],
            tmp_path / "ds",
            tmp_path / "classes.txt",
            log=lambda *_: None,
        )
    (tmp_path / "n").mkdir()
    tree = _openpose_tree(tmp_path / "n", "pose_keypoints_2d", 25)
    for path in (tmp_path / "n" / "op").rglob("*.json"):
        frame = json.loads(path.read_text())
        values = np.array(frame["people"][0]["pose_keypoints_2d"]).reshape(25, 3)
        values[:, :2] /= 64.0
        frame["people"][0]["pose_keypoints_2d"] = values.ravel().tolist()
        path.write_text(json.dumps(frame))
    said = []
    openpose.convert(
        tree["openpose"],
        tmp_path / "n" / "labels.csv",
        tree["videos"],
        tmp_path / "n" / "ds",
        tmp_path / "n" / "classes.txt",
        log=said.append,
    )
    assert any("every coordinate in [0, 1]" in line for line in said)


def test_frame_dirs_that_leave_the_dataset_are_refused(miga, tmp_path):
    for bad in ("../outside", "/etc/passwd", "a/../../b"):
        entries = [miga_entry(bad, 0, np.random.default_rng(0))]
        with open(miga / "train.pkl", "wb") as f:
            pickle.dump({"split": {"train": [bad]}, "annotations": entries}, f)
        with pytest.raises(
            AnnotationError, match="frame_dir: expected a relative name inside the dataset"
        ):
            load_index(miga)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (miga / "videos").mkdir()
    (miga / "videos" / "linked").symlink_to(outside, target_is_directory=True)
    with open(miga / "train.pkl", "wb") as f:
        pickle.dump(
            {
                "split": {"train": ["linked/clip"]},
                "annotations": [miga_entry("linked/clip", 0, np.random.default_rng(0))],
            },
            f,
        )
    with pytest.raises(
        AnnotationError, match="clip folder 'linked': resolves to .*elsewhere, outside"
    ):
        load_index(miga)


def test_small_pickles_cannot_allocate_much(tmp_path):
    bomb = tmp_path / "bomb.pkl"  # 46 bytes asking bytearray for 1.5 GB
    bomb.write_bytes(
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\tbytearray\x94\x93\x94"
        b"J\x00\x00\x00`\x85\x94R\x94."
    )
    with pytest.raises(AnnotationError, match=r"bytearray\(1610612736\).*refused"):
        safe_load_pickle(bomb)

    class Big:
        def __reduce__(self):
            return (np.ndarray, ((10**9,),))

    big = tmp_path / "big.pkl"
    big.write_bytes(pickle.dumps(Big()))
    with pytest.raises(AnnotationError, match="numpy.ndarray called directly"):
        safe_load_pickle(big)
    fine = tmp_path / "fine.pkl"
    fine.write_bytes(
        pickle.dumps({"a": np.zeros((3, 4), np.float32), "b": bytearray(b"ok")}, protocol=5)
    )
    assert safe_load_pickle(fine)["a"].shape == (3, 4)


def test_a_long_video_that_cannot_be_read_leaves_out_its_gestures_only(tmp_path):
    raw = raw_release(tmp_path, videos=True)
    (raw["videos"] / "0204.mp4").write_bytes(b"not a video")
    said = []
    out = imigue.convert(
        raw["src"], tmp_path / "ds", raw["split"], videos=raw["videos"], log=said.append
    )
    index = load_index(out)
    assert [a.frame_dir for a in index.split("train")] == ["0187_0", "0187_1", "0187_2"]
    assert "val" not in index.splits  # 0204's two gestures were its only ones
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        "0187_0.mp4",
        "0187_1.mp4",
        "0187_2.mp4",
    ]  # no scratch folder left
    assert any("0204.mp4" in line and "left out" in line for line in said), said
    assert said[-1].endswith("their gestures were left out: 0204")
    assert json.loads((out / "dataset.json").read_text())["converter"]["left_out_videos"] == [
        "0204"
    ]


def test_an_interrupted_conversion_resumes_with_the_videos_not_yet_cut(tmp_path):
    raw = raw_release(tmp_path, videos=True)
    given = []

    def one_then_killed(jobs, workers):
        given.append([j.video_id for j in jobs])
        yield from imigue.cut_serially(jobs[:1], workers)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imigue.convert(
            raw["src"],
            tmp_path / "ds",
            raw["split"],
            videos=raw["videos"],
            run_cuts=one_then_killed,
            log=lambda *_: None,
        )
    assert (tmp_path / ".ds.partial").is_dir() and not (tmp_path / "ds").exists()

    def counted(jobs, workers):
        given.append([j.video_id for j in jobs])
        yield from imigue.cut_serially(jobs, workers)

    out = imigue.convert(
        raw["src"],
        tmp_path / "ds",
        raw["split"],
        videos=raw["videos"],
        run_cuts=counted,
        log=lambda *_: None,
    )
    assert given == [["0187", "0204"], ["0204"]]
    assert len(list((out / "videos").iterdir())) == 5 and not (tmp_path / ".ds.partial").exists()
    assert load_index(out).split("val")[0].frame_dir == "0204_0"


def test_convert_imigue_cuts_the_videos_on_ray(tmp_path, capsys):
    raw = raw_release(tmp_path, videos=True)
    args = ["convert-imigue", "--src", str(raw["src"]), "--out", str(tmp_path / "ds")]
    args += ["--split-file", str(raw["split"]), "--videos", str(raw["videos"]), "--workers", "2"]
    assert cli.main(args) == 0
    assert "2/2 videos cut" in capsys.readouterr().out
    assert len(load_index(tmp_path / "ds").split("train")) == 3
