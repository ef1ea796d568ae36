"""Every bad-input case of issue 2, with the policy documented in mg_ray/data/dataset.py."""

import os
import pickle

import numpy as np
import pytest
import torch

from mg_ray.config import ConfigError, from_mapping
from mg_ray.data import AnnotationError, DataConfig, VideoError, build_dataset, load_index

from .helpers import make_entry, make_frames, write_dataset, write_video

torch.set_num_threads(1)
SMALL = dict(rgb_size=64, heatmap_size=16, rgb_frames=4, pose_frames=8)


def dataset(root, split="train", mode="train", **kw):
    return build_dataset(DataConfig(root=root, **{**SMALL, **kw}), split, mode, num_clips=1)


@pytest.fixture
def root(tmp_path):
    return write_dataset(tmp_path / "ds", num_clips=6, t=16)


def test_missing_video_raises_naming_the_clip(root):
    os.remove(root / "videos" / "clip001.mp4")
    ds = dataset(root, mode="test", skip_bad=True)  # evaluation never skips
    with pytest.raises(VideoError, match=r"clip 'clip001'.*video file not found"):
        ds[1]
    with pytest.raises(VideoError, match="clip001"):
        dataset(root, skip_bad=False)[1]


def test_missing_video_skipped_and_counted_in_train(root):
    os.remove(root / "videos" / "clip001.mp4")
    ds = dataset(root, skip_bad=True)
    item = ds[1]
    assert item["index"] != 1 and item["rgb"].shape == (3, 4, 64, 64)
    assert ds.stats["bad_video"] >= 1


def test_all_videos_broken_gives_up(root):
    for name in os.listdir(root / "videos"):
        os.remove(root / "videos" / name)
    with pytest.raises(VideoError, match="not found"):
        dataset(root, skip_bad=True)[0]


def test_corrupt_video(root):
    (root / "videos" / "clip002.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(VideoError, match=r"clip 'clip002'.*cannot open video"):
        dataset(root, mode="test")[2]


def test_truncated_video(root):
    path = root / "videos" / "clip003.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match="clip 'clip003'"):
        dataset(root, mode="test")[3]


def test_video_shorter_than_requested_frames_loops(tmp_path):
    root = write_dataset(tmp_path / "short", num_clips=3, t=5)
    item = dataset(root, rgb_frames=8, pose_frames=32)[0]
    assert item["rgb"].shape == (3, 8, 64, 64) and item["pose"].shape == (17, 32, 16, 16)


def test_video_with_fewer_frames_than_annotated_is_clamped_and_counted(root):
    write_video(root / "videos" / "clip000.mp4", make_frames(6, 64, 96))  # annotation says 16
    ds = dataset(root, mode="test")
    item = ds[0]
    assert item["rgb"].shape == (3, 4, 64, 64)
    assert ds.stats["clamped"] == 1


def test_nan_keypoints_refused_at_load(tmp_path):
    entries = [make_entry(f"c{i}", 0, 10, 64, 96, seed=i) for i in range(3)]
    entries[1]["keypoint"][0, 2, 5, 0] = np.nan
    root = write_dataset(tmp_path / "nan", entries=entries, write_videos=False)
    with pytest.raises(AnnotationError, match=r"clip 'c1': keypoint: contains NaN/inf"):
        load_index(root)


def test_no_person_gives_zero_heatmaps_and_whole_frame(tmp_path):
    entries = [make_entry(f"c{i}", 0, 10, 64, 96, seed=i) for i in range(3)]
    entries[0]["keypoint_score"][:] = 0
    root = write_dataset(tmp_path / "empty", entries=entries)
    ds = dataset(root, mode="test")
    item = ds[0]
    assert not item["pose"].any() and item["rgb"].abs().sum() > 0
    assert ds.stats["no_person"] == 1


def test_label_out_of_range(tmp_path):
    entries = [make_entry(f"c{i}", i, 10, 64, 96, seed=i) for i in range(3)]
    entries[2]["label"] = 7
    root = write_dataset(tmp_path / "lbl", entries=entries, num_classes=3, write_videos=False)
    with pytest.raises(AnnotationError, match=r"clip 'c2': label: expected a class id in \[0, 3\)"):
        load_index(root)


def test_missing_key_and_wrong_shape(tmp_path):
    entries = [make_entry(f"c{i}", 0, 10, 64, 96, seed=i) for i in range(3)]
    del entries[0]["total_frames"]
    root = write_dataset(tmp_path / "key", entries=entries, write_videos=False)
    with pytest.raises(AnnotationError, match="clip 'c0': total_frames: missing key"):
        load_index(root)
    entries[0]["total_frames"] = 10
    entries[1]["keypoint_score"] = entries[1]["keypoint_score"][:, :4]
    root = write_dataset(tmp_path / "shape", entries=entries, write_videos=False)
    with pytest.raises(AnnotationError, match="clip 'c1': keypoint_score: expected shape"):
        load_index(root)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload(tmp_path):
    root = write_dataset(tmp_path / "evil", write_videos=False)
    marker = tmp_path / "ran"
    (root / "annotations.pkl").write_bytes(
        pickle.dumps({"split": {}, "annotations": [Payload(marker)]})
    )
    with pytest.raises(AnnotationError, match="refused to load global"):
        load_index(root)
    assert not marker.exists()


def test_yaml_config_unknown_key_and_bad_values(tmp_path):
    from mg_ray.train.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  rgb_frame: 8\n")
    with pytest.raises(ConfigError, match="c.yaml: data.rgb_frame: unknown key"):
        load_config(str(path), {})
    path.write_text("data:\n  pose_frames: 0\n")
    with pytest.raises(ConfigError, match="pose_frames: expected an integer >= 1, got 0"):
        load_config(str(path), {})
    with pytest.raises(ConfigError, match="flip_prob: expected a number in \\[0, 1\\]"):
        from_mapping(DataConfig, {"flip_prob": 2})
