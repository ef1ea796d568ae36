import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mg_ray.config import ConfigError, from_mapping
from mg_ray.data import (
    DataConfig,
    build_dataset,
    clip_inputs,
    index_for,
    load_index,
    load_skeleton,
)
from mg_ray.data.dataset import MicroGestureDataset, PipelineParams
from mg_ray.data.layouts import COCO17

from .helpers import make_entry, make_frames, write_dataset, write_video

torch.set_num_threads(1)
SMALL = dict(rgb_size=64, heatmap_size=16, rgb_frames=4, pose_frames=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "ds", num_clips=6, t=20)


def cfg_for(root, **kw):
    return DataConfig(root=root, **{**SMALL, **kw})


def test_train_item_shapes(root):
    ds = build_dataset(cfg_for(root), "train", "train")
    item = ds[0]
    # light items: RGB leaves the loader as uint8, normalised on the training device
    assert item["rgb"].shape == (3, 4, 64, 64) and item["rgb"].dtype == torch.uint8
    assert item["pose"].shape == (17, 8, 16, 16) and item["pose"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["index"] == 0 and ds.clip_name(0) == "clip000"
    assert ds.num_classes == 3 and ds.class_names[1] == "class 1" and ds.pose_channels == 17
    assert item["pose"].max() > 0.3  # the person is drawn


def test_test_mode_clip_axis_and_determinism(root):
    ds = build_dataset(cfg_for(root, test_clips=3), "test", "test")
    a, b = ds[0], ds[0]
    assert a["rgb"].shape == (3, 3, 4, 64, 64) and a["pose"].shape == (3, 17, 8, 16, 16)
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["pose"], b["pose"])
    one = build_dataset(cfg_for(root), "val", "test", num_clips=1)[0]
    assert one["rgb"].shape == (3, 4, 64, 64)


def test_pose_only_items_skip_the_video_and_keep_the_pose(root, tmp_path):
    full = build_dataset(cfg_for(root), "train", "train")
    pose_only = build_dataset(cfg_for(root), "train", "train", rgb=False)
    torch.manual_seed(3)  # both generators start from it: the same frames, crops and flips
    items = [(full[i], pose_only[i]) for i in range(len(full))]
    for a, b in items:  # raw clips (img_shape = the video's size): exactly the same pose
        assert "rgb" not in b and torch.equal(a["pose"], b["pose"]) and a["label"] == b["label"]
    test_items = build_dataset(cfg_for(root, test_clips=2), "test", "test", rgb=False)[0]
    assert "rgb" not in test_items and test_items["pose"].shape == (2, 17, 8, 16, 16)

    # No video is opened: a pose-only dataset trains even where the videos are gone.
    import shutil

    copy = shutil.copytree(root, tmp_path / "no_videos")
    shutil.rmtree(copy / "videos")
    assert build_dataset(cfg_for(copy), "train", "train", rgb=False)[0]["pose"].max() > 0.3


def test_limb_channels(root):
    ds = build_dataset(cfg_for(root, heatmap="limbs"), "train", "train")
    assert ds.pose_channels == len(COCO17.limbs) == ds[1]["pose"].shape[0]
    assert DataConfig().pose_channels(COCO17) == 17


def test_paper_sizes(root):
    item = build_dataset(DataConfig(root=root), "train", "train")[0]
    assert item["rgb"].shape == (3, 8, 224, 224) and item["pose"].shape == (17, 32, 56, 56)


def test_dataloader_two_workers_reproducible_and_workers_differ(root):
    ds = build_dataset(cfg_for(root), "train", "train")

    def run():
        torch.manual_seed(0)
        loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
        return [b for b in loader]

    first, second = run(), run()
    assert first[0]["rgb"].shape == (1, 3, 4, 64, 64)
    for a, b in zip(first, second):
        assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["pose"], b["pose"])
    # items 0 and 1 go to different workers; with equal per-worker seeds their draws would be
    # equal too. Re-reading item 0 in the main process with another seed changes it.
    torch.manual_seed(1)
    other = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert any(not torch.equal(a["rgb"], b["rgb"]) for a, b in zip(first, other))
    assert ds.stats["items"] >= 3 * len(ds)  # counters add up over the workers


def test_prepared_video_size_scales_keypoints(tmp_path):
    """A clip re-encoded at half size gives the same pose input: keypoints are rescaled from
    img_shape to the decoded size."""
    entry = make_entry("c", 0, 20, 96, 128, seed=3)
    full = write_dataset(
        tmp_path / "full", entries=[entry], split={"train": ["c"], "val": ["c"], "test": ["c"]}
    )
    half = write_dataset(
        tmp_path / "half",
        entries=[entry],
        split={"train": ["c"], "val": ["c"], "test": ["c"]},
        write_videos=False,
    )
    write_video(half / "videos" / "c.mp4", make_frames(20, 48, 64))
    a = build_dataset(cfg_for(full), "test", "test", num_clips=1)[0]["pose"]
    b = build_dataset(cfg_for(half), "test", "test", num_clips=1)[0]["pose"]
    # Same joints in the same places: heatmap centroids agree to a fraction of a heatmap pixel
    # (the crop box is rounded to whole pixels of each video, so values differ slightly).
    grid = torch.arange(16.0)

    def centroids(h):
        mass = h.sum((-1, -2)).clamp_min(1e-6)
        return torch.stack(
            [(h.sum(-2) * grid).sum(-1) / mass, (h.sum(-1) * grid).sum(-1) / mass], -1
        )

    visible = a.sum((-1, -2)) > 0.5
    assert visible.float().mean() > 0.5
    assert (centroids(a) - centroids(b))[visible].abs().max() < 0.6


def test_clip_inputs_and_skeleton_files(root, tmp_path):
    index = load_index(root)
    ann = index.split("test")[0]
    np.savez(
        tmp_path / "s.npz",
        keypoint=ann.keypoint,
        keypoint_score=ann.keypoint_score,
        img_shape=np.array(ann.img_shape),
    )
    (tmp_path / "s.json").write_text(
        json.dumps({"keypoint": ann.keypoint[0].tolist(), "img_shape": list(ann.img_shape)})
    )
    kp, score, shape = load_skeleton(tmp_path / "s.npz")
    assert kp.shape == ann.keypoint.shape and shape == ann.img_shape
    kp1, score1, _ = load_skeleton(tmp_path / "s.json")
    assert kp1.shape == (1, *ann.keypoint.shape[1:]) and (score1 == 1).all()
    params = PipelineParams(rgb_frames=4, pose_frames=8, rgb_size=64, heatmap_size=16)
    out = clip_inputs(
        index.video_path(ann.frame_dir), kp, score, shape, params, mode="test", num_clips=2
    )
    assert out.rgb.shape == (2, 3, 4, 64, 64) and out.pose.shape == (2, 17, 8, 16, 16)
    ds = MicroGestureDataset(index, "test", "test", num_clips=2, params=params)
    assert torch.equal(ds[0]["pose"], out.pose)
    (tmp_path / "bad.json").write_text(json.dumps({"keypoint": [[[1.0, float("nan")]]]}))
    with pytest.raises(ValueError, match="bad.json: keypoint: contains NaN"):
        load_skeleton(tmp_path / "bad.json")


def test_config_validation_names_keys():
    with pytest.raises(ConfigError, match="data.heatmap_size: expected rgb_size / 4"):
        from_mapping(DataConfig, {"rgb_size": 224, "heatmap_size": 32}, "data")
    cfg = from_mapping(
        DataConfig, {"rgb_size": 224, "heatmap_size": 32, "allow_any_heatmap_size": True}
    )
    assert cfg.heatmap_size == 32
    with pytest.raises(ConfigError, match="data.frames: unknown key"):
        from_mapping(DataConfig, {"frames": 3}, "data")
    with pytest.raises(ConfigError, match="heatmap: expected one of 'joints', 'limbs'"):
        from_mapping(DataConfig, {"heatmap": "bones"})
    with pytest.raises(ConfigError, match="sigma: expected a number > 0"):
        from_mapping(DataConfig, {"sigma": 0})
    with pytest.raises(ConfigError, match="layout: expected null or one of"):
        from_mapping(DataConfig, {"layout": "h36m"})


def test_shared_tiny_dataset_loads(tiny_dataset):
    ds = build_dataset(cfg_for(tiny_dataset), "train", "train")
    item = ds[0]
    assert item["rgb"].shape == (3, 4, 64, 64) and item["pose"].shape[0] == ds.pose_channels


def read_only(index):
    """`index` as Ray's object store hands it to a worker: every array read-only."""
    for clips in index.splits.values():
        for ann in clips:
            ann.keypoint.flags.writeable = False
            ann.keypoint_score.flags.writeable = False
    return index


def test_a_loaded_read_only_index_gives_the_same_items(root):
    """A study's workers share the driver's index (`SharedIndex`): every split is built from it,
    its arrays read-only, and the items are those of a dataset that loads its own index."""
    cfg = cfg_for(root, test_clips=2)
    index = read_only(index_for(cfg))
    for split, mode in (("train", "train"), ("val", "test"), ("test", "test")):
        shared, own = build_dataset(cfg, split, mode, index=index), build_dataset(cfg, split, mode)
        assert shared.index is index
        for i in range(len(own)):
            if mode == "train":  # the same random crop and flip
                torch.manual_seed(i)
                shared._rng = own._rng = None
            a, b = shared[i], own[i]
            assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["pose"], b["pose"])


def test_the_index_source_names_what_an_index_is_loaded_from(root):
    cfg = cfg_for(root)
    assert cfg.index_source() == cfg_for(root, rgb_frames=8, flip_prob=0.0).index_source()
    assert cfg.index_source() != cfg_for(root, annotation_file="other.pkl").index_source()
    assert cfg.index_source() != cfg_for(root, layout="coco17").index_source()
