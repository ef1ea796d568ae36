"""The synthetic generator: format, determinism, split hygiene, safety of the output folder, and
that both modalities carry learnable signal."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import decord
import numpy as np
import pytest

from mg_ray import cli
from mg_ray.data import synth, video_io
from tests.data.conftest import TINY_SETTINGS


def _load(folder: Path) -> dict:
    with open(folder / "annotations.pkl", "rb") as f:  # a file this test suite just wrote
        return pickle.load(f)


def test_tiny_dataset_has_the_agreed_layout(tiny_dataset: Path):
    data = _load(tiny_dataset)
    assert set(data) == {"split", "annotations"}
    classes = (tiny_dataset / "classes.txt").read_text().splitlines()
    assert classes == [g.name for g in synth.GESTURES]
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["layout"] == "coco17" and meta["num_classes"] == len(classes) == 10
    assert meta["generator"]["seed"] == 0
    digest = hashlib.sha256(
        (tiny_dataset / "annotations.pkl").read_bytes()
        + (tiny_dataset / "classes.txt").read_bytes()
    ).hexdigest()
    assert meta["fingerprint"] == digest

    frames, h, w = TINY_SETTINGS["frames"], TINY_SETTINGS["height"], TINY_SETTINGS["width"]
    assert len(data["annotations"]) == 3 * 10
    for ann in data["annotations"]:
        assert isinstance(ann["frame_dir"], str) and isinstance(ann["label"], int)
        assert 0 <= ann["label"] < 10
        assert ann["img_shape"] == ann["original_shape"] == (h, w)
        assert ann["total_frames"] == frames
        kp, score = ann["keypoint"], ann["keypoint_score"]
        assert kp.dtype == np.float32 and kp.shape == (1, frames, 17, 2)
        assert score.dtype == np.float32 and score.shape == (1, frames, 17)
        assert np.isfinite(kp).all() and ((score >= 0) & (score <= 1)).all()
        # Detected joints lie inside the frame; undetected ones are (0, 0) with score 0.
        seen = score > 0
        assert ((kp[..., 0] >= 0) & (kp[..., 0] < w) & (kp[..., 1] >= 0) & (kp[..., 1] < h))[
            seen
        ].all()
        assert (kp[~seen] == 0).all()
        assert (score[..., 13:] == 0).all()  # knees and ankles hidden under the desk
        assert seen[..., :13].mean() > 0.9  # but the upper body is mostly detected


def test_videos_decode_to_total_frames(tiny_dataset: Path):
    decord = pytest.importorskip("decord")
    for ann in _load(tiny_dataset)["annotations"][:5]:
        reader = decord.VideoReader(str(tiny_dataset / "videos" / f"{ann['frame_dir']}.mp4"))
        assert len(reader) == ann["total_frames"]
        frame = reader[len(reader) - 1].asnumpy()
        assert frame.shape == ann["img_shape"] + (3,) and frame.dtype == np.uint8


def test_split_is_cross_subject_and_complete():
    cfg = synth.SynthConfig(subjects=12, clips_per_class=2)
    plans = synth.plan_clips(cfg)
    subjects = {
        name: {p.subject for p in plans if p.split == name} for name in ("train", "val", "test")
    }
    assert [len(subjects[n]) for n in ("train", "val", "test")] == [8, 2, 2]
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    assert len({p.frame_dir for p in plans}) == len(plans) == 12 * 10 * 2
    # every class appears equally often in every split
    for name in ("train", "val", "test"):
        counts = np.bincount([p.label for p in plans if p.split == name], minlength=10)
        assert len(set(counts)) == 1


def test_tiny_dataset_split_lists_every_clip_once(tiny_dataset: Path):
    data = _load(tiny_dataset)
    listed = [d for names in data["split"].values() for d in names]
    assert sorted(listed) == sorted(a["frame_dir"] for a in data["annotations"])
    subject_of = {a["frame_dir"]: a["subject"] for a in data["annotations"]}
    per_split = [{subject_of[d] for d in data["split"][n]} for n in ("train", "val", "test")]
    assert all(len(s) == 1 for s in per_split) and len(set.union(*per_split)) == 3


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path):
    small = dict(TINY_SETTINGS, subjects=3, clips_per_class=1, frames=16, width=96, height=72)
    a = synth.generate(tmp_path / "a", **dict(small, workers=1))
    b = synth.generate(tmp_path / "b", **dict(small, workers=2))
    c = synth.generate(tmp_path / "c", **dict(small, workers=1, seed=1))
    assert (a / "annotations.pkl").read_bytes() == (b / "annotations.pkl").read_bytes()
    assert json.loads((a / "dataset.json").read_text()) == json.loads(
        (b / "dataset.json").read_text()
    )
    # The drawn frames can differ in rare last-bit roundings between processes (numpy picks SIMD
    # or scalar loops by array alignment), and H.264 carries that on: compare the decoded frames,
    # which must be the same pictures.
    for video in sorted((a / "videos").iterdir()):
        if video.read_bytes() == (b / "videos" / video.name).read_bytes():
            continue
        first = decord.VideoReader(str(video)).get_batch(list(range(16))).asnumpy().astype(np.int16)
        second = (
            decord.VideoReader(str(b / "videos" / video.name))
            .get_batch(list(range(16)))
            .asnumpy()
            .astype(np.int16)
        )
        assert np.abs(first - second).mean() < 0.5, video.name
    assert (a / "annotations.pkl").read_bytes() != (c / "annotations.pkl").read_bytes()


def test_render_clip_is_pure():
    cfg = synth.SynthConfig(frames=16)
    plan = synth.ClipPlan("x", subject=2, label=7, repeat=0, split="train")
    first, second = synth.render_clip(cfg, plan), synth.render_clip(cfg, plan)
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)


def test_refuses_to_overwrite_without_force(tmp_path: Path):
    small = dict(TINY_SETTINGS, subjects=3, clips_per_class=1, frames=16, width=64, height=64)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    with pytest.raises(video_io.DatasetWriteError, match="mine.*not empty"):
        synth.generate(user, **small)
    with pytest.raises(video_io.DatasetWriteError, match="not an mg-ray dataset"):
        synth.generate(user, force=True, **small)
    assert (user / "notes.txt").read_text() == "precious" and len(list(user.iterdir())) == 1

    out = synth.generate(tmp_path / "ds", **small)
    with pytest.raises(video_io.DatasetWriteError, match="--force"):
        synth.generate(out, **small)
    before = (out / "annotations.pkl").read_bytes()
    synth.generate(out, force=True, **dict(small, seed=5))
    assert (out / "annotations.pkl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mine"]  # no leftovers


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "write_video", broken)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "ds", **dict(TINY_SETTINGS, frames=16))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "settings, key",
    [({"subjects": 2}, "subjects"), ({"width": 161}, "width"), ({"frames": 4}, "frames")],
)
def test_bad_settings_name_the_key(settings: dict, key: str, tmp_path: Path):
    with pytest.raises(ValueError, match=key):
        synth.generate(tmp_path / "x", **settings)
    assert not (tmp_path / "x").exists()


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli"
    argv = [
        "synth",
        "--out",
        str(out),
        "--subjects",
        "3",
        "--clips-per-class",
        "1",
        "--frames",
        "16",
        "--size",
        "96x72",
        "--workers",
        "1",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train 10 (1 subjects)" in printed and "generated in" in printed
    assert cli.main(argv) == 2  # exists: refused
    assert "--force" in capsys.readouterr().err
    assert cli.main(argv + ["--force"]) == 0


# ---------------------------------------------------------------------------------------------
# Learnability: cheap hand-made features + numpy logistic regression, cross-subject train -> held out


def _pose_features(kp: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Where the more active wrist goes (body-normalised, mirrored so handedness cancels), how far,
    for how long, how many separate contacts; the same for the other wrist."""
    kp, ok = kp[0].astype(np.float64), score[0] > 0
    shoulders = [np.median(kp[ok[:, j], j], 0) for j in (5, 6)]
    centre, width = (shoulders[0] + shoulders[1]) / 2, np.linalg.norm(shoulders[0] - shoulders[1])
    t = np.arange(len(kp))
    hands = []
    for joint, mirror in ((9, 1.0), (10, -1.0)):
        seen = ok[:, joint]
        xy = np.stack([np.interp(t, t[seen], kp[seen, joint, d]) for d in (0, 1)], -1)
        xy = (xy - centre) / width * [mirror, 1.0]
        disp = np.linalg.norm(xy - np.median(xy[:6], 0), axis=-1)
        hands.append((disp, xy))
    acting = int(np.argmax([d.max() for d, _ in hands]))
    feats = []
    for disp, xy in (hands[acting], hands[1 - acting]):
        above = disp > 0.5 * disp.max()
        feats += [
            *xy[disp > 0.7 * disp.max()].mean(0),
            disp.max(),
            above.mean(),
            np.sum(above[1:] & ~above[:-1]),
        ]
    return np.array(feats)


def _rgb_features(frames: np.ndarray) -> np.ndarray:
    """Per-frame colour statistics (strongly red / vivid pixel counts) and a coarse 4x4 map of
    where the image changes over time, on every 3rd frame at half resolution."""
    f = frames[::3, ::2, ::2].astype(np.int16)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    red = (r > g + 100) & (r > b + 80)
    hi, lo = f.max(-1), f.min(-1)
    vivid = ((hi - lo) > 0.7 * hi) & (hi > 120) & ~red
    motion = f.mean(-1, dtype=np.float32).std(0)
    h, w = motion.shape
    grid = motion[: h // 4 * 4, : w // 4 * 4].reshape(4, h // 4, 4, w // 4).mean((1, 3)).ravel()
    counts = [red.sum((1, 2)), vivid.sum((1, 2))]
    return np.log1p(np.array([c.max() for c in counts] + [c.mean() for c in counts] + list(grid)))


def _logistic_regression(x_train, y_train, x_test, classes: int, steps: int = 400) -> np.ndarray:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
    x_test = np.c_[(x_test - mean) / std, np.ones(len(x_test))]
    weights, onehot = np.zeros((x_train.shape[1], classes)), np.eye(classes)[y_train]
    for _ in range(steps):
        z = x_train @ weights
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        weights -= 0.5 * (x_train.T @ (p - onehot) / len(x_train) + 1e-3 * weights)
    return (x_test @ weights).argmax(1)


def test_synth_is_learnable_from_pose_and_rgb():
    # Default look and size, fewer clips: 9 subjects (5 train / 4 held out) x 10 classes x 2.
    cfg = synth.SynthConfig(subjects=9, clips_per_class=2)
    pose, rgb, labels, train = [], [], [], []
    looks = {s: synth.make_look(cfg.seed, s, cfg.width, cfg.height) for s in range(cfg.subjects)}
    for plan in synth.plan_clips(cfg):
        frames, kp, score = synth.render_clip(cfg, plan, looks[plan.subject])
        pose.append(_pose_features(kp, score))
        rgb.append(_rgb_features(frames))
        labels.append(plan.label)
        train.append(plan.split == "train")
    pose, rgb, labels, train = map(np.array, (pose, rgb, labels, train))
    test = ~train

    def accuracy(x, classes=(range(10))):
        keep = np.isin(labels, list(classes))
        y = np.searchsorted(sorted(classes), labels)
        pred = _logistic_regression(x[train & keep], y[train & keep], x[test & keep], len(classes))
        return float((pred == y[test & keep]).mean())

    acc = {
        name: accuracy(x) for name, x in (("pose", pose), ("rgb", rgb), ("fused", np.c_[pose, rgb]))
    }
    # Pairs whose keypoints look alike by design (touch/rub face, touch/rub chest, hold/rub in lap).
    pairs = [(0, 1), (4, 5), (7, 8)]
    pose_pairs = np.mean([accuracy(pose, p) for p in pairs])
    rgb_pairs = np.mean([accuracy(rgb, p) for p in pairs])
    print(
        f"val+test top-1: {acc}; touch/rub/hold pairs: pose {pose_pairs:.2f}, rgb {rgb_pairs:.2f}"
    )
    chance = 0.1
    assert acc["pose"] >= 5 * chance  # pose alone: target and timing
    assert acc["rgb"] >= 2.5 * chance  # RGB alone: manner (+ some location)
    assert rgb_pairs >= 0.85 and pose_pairs <= 0.75  # RGB sees what keypoints cannot
    assert acc["fused"] >= max(acc["pose"], acc["rgb"]) + 0.05  # the two add up


def test_two_drivers_in_a_fresh_home_generate_the_default_dataset_once(tmp_path):
    """`check.generate_once`: the second of two drivers started together waits for the first's
    dataset instead of racing it (and being told to pass --force)."""
    import threading
    import time

    from mg_ray.data.check import generate_once

    root = tmp_path / "home" / "synthetic"
    made = []

    def make(folder):
        time.sleep(0.3)  # the second driver arrives while the first generates
        folder.mkdir()
        made.append(threading.current_thread().name)

    threads = [threading.Thread(target=generate_once, args=(root, make)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and root.is_dir()
