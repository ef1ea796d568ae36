"""`mg-ray prepare`: smaller clips with short keyframe intervals, annotations scaled to match, the
source untouched."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from mg_ray import cli
from mg_ray.data import prepare, video_io

decord = pytest.importorskip("decord")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _load(folder: Path) -> dict:
    with open(folder / "annotations.pkl", "rb") as f:  # written by the code under test
        return pickle.load(f)


def test_target_size_keeps_aspect_even_and_never_upscales():
    assert prepare.target_size(720, 1280, 256) == (256, 456)
    assert prepare.target_size(1280, 720, 256) == (456, 256)
    assert prepare.target_size(120, 160, 64) == (64, 86)
    assert prepare.target_size(120, 160, 256) == (120, 160)


def test_scale_keypoints_keeps_undetected_at_zero():
    kp = np.array([[[[0.0, 0.0], [160.0, 120.0], [80.0, 30.0]]]], np.float32)
    scaled = prepare.scale_keypoints(kp, (120, 160), (64, 86))
    np.testing.assert_allclose(scaled[0, 0], [[0, 0], [86, 64], [43, 16]], rtol=1e-6)
    assert scaled.dtype == np.float32


@pytest.fixture(scope="module")
def prepared(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    before = _digest(tiny_dataset)
    out = prepare.prepare(
        tiny_dataset,
        tmp_path_factory.mktemp("prep") / "small",
        short_side=64,
        gop=4,
        workers=2,
        log=lambda *_: None,
    )
    assert _digest(tiny_dataset) == before  # the source is never modified
    return out, before


def test_prepared_clips_decode_to_the_same_frames_smaller(prepared, tiny_dataset: Path):
    out, _ = prepared
    source, result = _load(tiny_dataset), _load(out)
    assert result["split"] == source["split"]
    assert (out / "classes.txt").read_text() == (tiny_dataset / "classes.txt").read_text()
    for old, new in zip(source["annotations"], result["annotations"]):
        assert new["frame_dir"] == old["frame_dir"] and new["label"] == old["label"]
        assert new["total_frames"] == old["total_frames"] and new["subject"] == old["subject"]
        assert new["img_shape"] == (64, 86) and new["original_shape"] == old["original_shape"] == (
            120,
            160,
        )
        np.testing.assert_allclose(
            new["keypoint"], old["keypoint"] * np.array([86 / 160, 64 / 120], np.float32), rtol=1e-5
        )
        np.testing.assert_array_equal(new["keypoint_score"], old["keypoint_score"])
        assert new["keypoint"].dtype == np.float32
    for ann in result["annotations"][:4]:
        small = decord.VideoReader(str(out / "videos" / f"{ann['frame_dir']}.mp4"))
        big = decord.VideoReader(str(tiny_dataset / "videos" / f"{ann['frame_dir']}.mp4"))
        assert len(small) == ann["total_frames"]
        # Same pictures in the same order: on an 8x8 grid of block means, each prepared frame is
        # closest to the source frame with the same index.
        index = [0, ann["total_frames"] // 2, ann["total_frames"] - 1]
        got = small.get_batch(index).asnumpy()
        assert got.shape == (3, 64, 86, 3)
        ref = big.get_batch(index).asnumpy()
        rows, cols = (np.arange(120) * 64 // 120), (np.arange(160) * 86 // 160)
        coarse = lambda x: x.astype(np.float32).reshape(8, 15, 8, 20, 3).mean((1, 3))
        dist = np.array(
            [[np.abs(coarse(g[rows][:, cols]) - coarse(r)).mean() for r in ref] for g in got]
        )
        assert (dist.argmin(1) == [0, 1, 2]).all() and dist.diagonal().max() < 3.0, dist


def test_prepared_metadata_records_the_source(prepared, tiny_dataset: Path):
    out, _ = prepared
    meta = json.loads((out / "dataset.json").read_text())
    source_meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert meta["prepared"]["source_fingerprint"] == source_meta["fingerprint"]
    assert meta["prepared"]["short_side"] == 64 and meta["prepared"]["gop"] == 4
    assert meta["fingerprint"] == video_io.fingerprint(out) != source_meta["fingerprint"]
    assert meta["layout"] == "coco17" and meta["num_classes"] == 10


def test_missing_video_names_the_clip(tiny_dataset: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "videos").iterdir())[3]
    victim.unlink()
    with pytest.raises(prepare.PrepareError, match=f"clip '{victim.stem}'.*not found"):
        prepare.prepare(broken, tmp_path / "out", short_side=64, workers=1)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_video_is_named_and_left_out_while_the_rest_is_written(
    tiny_dataset: Path, tmp_path: Path
):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    victim = sorted((broken / "videos").iterdir())[5]
    victim.write_bytes(b"not a video at all")
    said = []
    out = prepare.prepare(broken, tmp_path / "out", short_side=64, workers=1, log=said.append)
    assert any(f"clip '{victim.stem}'" in line and "left out" in line for line in said), said
    assert said[-1].endswith(f"could not be read and were left out of {out}: {victim.stem}")
    data = _load(out)
    assert victim.stem not in {a["frame_dir"] for a in data["annotations"]}
    assert len(data["annotations"]) == 29
    assert all(victim.stem not in members for members in data["split"].values())
    assert json.loads((out / "dataset.json").read_text())["prepared"]["left_out"] == [victim.stem]
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(
        f"{a['frame_dir']}.mp4" for a in data["annotations"]
    )  # no partial file of the bad clip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]  # no stage left


def test_an_interrupted_prepare_resumes_where_it_stopped(tiny_dataset: Path, tmp_path: Path):
    """Killed after three clips (here: the runner raises, as Ctrl-C or SIGTERM would), the run
    leaves its stage; the same call again writes only the other 27 clips."""
    given = []

    def three_then_killed(jobs, workers):
        given.append(len(jobs))
        for n, result in enumerate(prepare.in_processes(jobs, workers)):
            if n == 3:
                raise KeyboardInterrupt
            yield result

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(tiny_dataset, out, short_side=64, workers=1, run_jobs=three_then_killed)
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()

    def counted(jobs, workers):
        given.append(len(jobs))
        yield from prepare.in_processes(jobs, workers)

    said = []
    prepare.prepare(tiny_dataset, out, short_side=64, workers=2, run_jobs=counted, log=said.append)
    assert given == [30, 27] and any("3 already written" in line for line in said)
    assert len(_load(out)["annotations"]) == 30 and len(list((out / "videos").iterdir())) == 30
    assert not (tmp_path / ".out.partial").exists()
    assert not {".journal.jsonl", ".settings.json"} & {p.name for p in out.iterdir()}
    # a stage left with other settings is not resumed: it is started afresh
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(
            tiny_dataset, tmp_path / "o2", short_side=64, workers=1, run_jobs=three_then_killed
        )
    said.clear()
    prepare.prepare(
        tiny_dataset, tmp_path / "o2", short_side=32, workers=2, run_jobs=counted, log=said.append
    )
    assert given[-1] == 30 and any("other settings; starting afresh" in s for s in said)


def test_refuses_output_inside_source_and_existing_folders(tiny_dataset: Path, tmp_path: Path):
    with pytest.raises(prepare.PrepareError, match="outside the source"):
        prepare.prepare(tiny_dataset, tiny_dataset / "prepared", workers=1)
    with pytest.raises(prepare.PrepareError, match="outside the source"):
        prepare.prepare(tiny_dataset, tiny_dataset, workers=1)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    with pytest.raises(video_io.DatasetWriteError, match="not empty"):
        prepare.prepare(tiny_dataset, taken, workers=1)


def test_cli(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "p"
    assert (
        cli.main(
            [
                "prepare",
                "--src",
                str(tiny_dataset),
                "--out",
                str(out),
                "--short-side",
                "32",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "30 clips" in capsys.readouterr().out
    assert _load(out)["annotations"][0]["img_shape"] == (32, 42)
    assert cli.main(["prepare", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "q")]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_frame_dir_leaving_the_dataset_writes_nothing_outside_out(
    tiny_dataset: Path, tmp_path: Path
):
    crafted = tmp_path / "crafted"
    shutil.copytree(tiny_dataset, crafted)
    data = _load(crafted)
    victim = data["annotations"][0]["frame_dir"]
    (crafted / "videos" / f"{victim}.mp4").rename(
        crafted / "escape.mp4"
    )  # a real video, outside videos/
    data["annotations"][0]["frame_dir"] = "../escape"
    with open(crafted / "annotations.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(
        prepare.PrepareError, match=r"frame_dir: expected a relative name .* got '\.\./escape'"
    ):
        prepare.prepare(crafted, tmp_path / "out", short_side=64, workers=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.mp4").exists()


@pytest.fixture(scope="module")
def stores(prepared, tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path):
    """The tiny dataset as the `prepared` fixture's H.264 clips and as both frame stores, same
    size (short side 64)."""
    out = {"video": prepared[0]}
    for store in ("jpeg", "uint8"):
        out[store] = prepare.prepare(
            tiny_dataset,
            tmp_path_factory.mktemp(store) / "small",
            short_side=64,
            workers=2,
            store=store,
            log=lambda *_: None,
        )
    return out


def test_a_frame_store_holds_every_frame_where_the_index_looks(stores, tiny_dataset: Path):
    from mg_ray.data import load_index

    source = load_index(tiny_dataset)
    for store, kind in (("jpeg", ""), ("uint8", ".npy")):
        meta = json.loads((stores[store] / "dataset.json").read_text())
        assert meta["frame_store"] == {"format": store, "folder": "frames"}
        assert not (stores[store] / "videos").exists()
        index = load_index(stores[store])
        assert index.video_ext == kind and index.fingerprint == meta["fingerprint"]
        ann = index.split("train")[0]
        path = index.video_path(ann.frame_dir)
        if store == "jpeg":  # mmaction2's rawframes: img_00001.jpg, ..., one file per frame
            names = sorted(p.name for p in path.iterdir())
            assert names[0] == "img_00001.jpg" and len(names) == ann.total_frames
        else:
            assert np.load(path).shape == (ann.total_frames, 64, 86, 3)
        assert [a.frame_dir for a in index.split("val")] == [
            a.frame_dir for a in source.split("val")
        ]


def test_frame_store_samples_equal_the_video_paths_up_to_the_codecs(stores):
    """Same seed, same sampled frames, same augmentations: the items of the three stores differ
    only by the codecs' rounding. The uint8 store holds the resized frames themselves; the H.264
    clips (crf 20) and the JPEGs (quality 90) are each a lossy copy of them."""
    import torch

    from mg_ray.data import DataConfig, build_dataset

    items = {}
    for store, root in stores.items():
        cfg = DataConfig(root=str(root), rgb_size=64, heatmap_size=16, rgb_frames=8)
        ds = build_dataset(cfg, "train", "train")
        torch.manual_seed(0)  # the dataset's augmentation generator is seeded from it
        items[store] = [ds[i] for i in range(4)]
    other_seed = build_dataset(
        DataConfig(root=str(stores["uint8"]), rgb_size=64, heatmap_size=16, rgb_frames=8),
        "train",
        "train",
    )
    torch.manual_seed(1)
    for i, exact in enumerate(items["uint8"]):
        assert exact["rgb"].shape == (3, 8, 64, 64)
        for store in ("video", "jpeg"):
            ours = items[store][i]
            torch.testing.assert_close(ours["pose"], exact["pose"])  # the same skeleton crop
            # uint8 items: measured 2.9-3.3 grey levels at this tiny size (64x86 frames of
            # sharp synthetic edges); another seed: 15-18
            assert (ours["rgb"].float() - exact["rgb"].float()).abs().mean() < 4.5, (store, i)
        # another seed samples other frames and crops: far further apart than the codecs
        assert (other_seed[i]["rgb"].float() - exact["rgb"].float()).abs().mean() > 10


def test_a_frame_store_clip_that_is_gone_or_broken_is_a_video_error(stores, tmp_path: Path):
    from mg_ray.data.video import VideoError, read_frames

    broken = tmp_path / "c.npy"
    broken.write_bytes(b"not an array")
    with pytest.raises(VideoError, match="c.npy: cannot read the frame array"):
        read_frames(broken, np.arange(3))
    empty = tmp_path / "clip"
    empty.mkdir()
    with pytest.raises(VideoError, match="clip: the clip has no frames"):
        read_frames(empty, np.arange(3))
    frames = read_frames(min((stores["jpeg"] / "frames").iterdir()), np.array([0, 99]))
    assert frames.clamped and frames.frames.shape[0] == 2
