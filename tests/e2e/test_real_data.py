"""End to end on the real iMiGUE formats, with files written here to the public recipes:

- the organisers' raw release converts (`mg-ray convert-imigue`), passes `mg-ray check-data`, and
  a pose stage trains on it for an epoch;
- a MiGA-style 22-joint dataset with per-split pickles (the test split unlabeled) trains a pose
  stage for an epoch, and the registered model writes a MiGA submission for the unlabeled split;
- a skeleton that does not fit the model is a one-line error naming both layouts.
"""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from tests.data.test_real_data import CLASSES, miga_entry, raw_release
from tests.e2e.helpers import cli_env, command, mlflow_client, run, runs

pytestmark = pytest.mark.slow

POSE_ARGS = (
    "train",
    "--stage",
    "pose",
    "--workers",
    "2",
    "--cpus-per-worker",
    "1",
    "--epochs",
    "1",
    "--set",
    "data.test_split=null",
    "--set",
    "optim.warmup_epochs=0",
    "--set",
    "optim.batch_size=4",
)


def test_raw_release_and_miga_pickles_train_and_an_unlabeled_split_gets_a_submission(tmp_path):
    import subprocess

    home = tmp_path / "home"
    raw = raw_release(tmp_path, videos=False)
    converted = tmp_path / "imigue"
    run(
        home,
        "convert-imigue",
        "--src",
        str(raw["src"]),
        "--out",
        str(converted),
        "--split-file",
        str(raw["split"]),
    )
    checked = run(home, "check-data", str(converted))
    assert "layout: imigue22" in checked.stdout and "usable" in checked.stdout
    run(home, *POSE_ARGS, "--data", str(converted), "--name", "raw-pose")

    rng = np.random.default_rng(3)
    miga = tmp_path / "miga"
    miga.mkdir()
    for split, count, labeled in (("train", 8, True), ("val", 4, True), ("test", 5, False)):
        names = [f"{split}{i:04d}_{i}" for i in range(count)]
        entries = [
            miga_entry(n, (i % 4) if labeled else None, rng, frames=30) for i, n in enumerate(names)
        ]
        with open(miga / f"{split}.pkl", "wb") as f:
            pickle.dump({"split": {split: names}, "annotations": entries}, f)
    (miga / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    run(home, *POSE_ARGS, "--data", str(miga), "--name", "miga-pose")

    client = mlflow_client(home)
    [trained] = runs(client, "tags.`mg_ray.train_run` = 'miga-pose'")
    assert trained.info.status == "FINISHED"
    run(home, "promote", "--run", trained.info.run_id, "--name", "miga-pose")
    out = tmp_path / "Submission.zip"
    done = run(
        home,
        "predict",
        "--model",
        "models:/miga-pose@candidate",
        "--data",
        str(miga),
        "--split",
        "test",
        "--serial",  # (Ray Data's path for a split: tests/e2e/test_serving.py)
        "--submission",
        str(out),
    )
    assert "Submission.csv with 5 clips" in done.stdout
    lines = zipfile.ZipFile(out).read("Submission.csv").decode().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"test{i:04d}_{i}" for i in range(5)]
    assert all(0 <= int(line.split(",")[1]) < 32 for line in lines)
    top5 = (tmp_path / "Submission.top5.csv").read_text().splitlines()
    assert len(top5) == 1 + 5 and top5[0].startswith("clip_name,class_id_1,class_1,prob_1")

    # the ensemble writes the same from its fused scores (here a degenerate one: the model twice)
    ens = tmp_path / "Ensemble.zip"
    run(
        home,
        "ensemble",
        "--runs",
        trained.info.run_id,
        trained.info.run_id,
        "--data",
        str(miga),
        "--split",
        "test",
        "--submission",
        str(ens),
    )
    assert zipfile.ZipFile(ens).read("Submission.csv").decode().splitlines() == lines

    # a skeleton of another layout: one line naming both
    skeleton = tmp_path / "clip.npz"
    np.savez(
        skeleton,
        keypoint=rng.uniform(0, 60, (1, 30, 17, 2)).astype(np.float32),
        keypoint_score=np.ones((1, 30, 17), np.float32),
    )
    video = tmp_path / "clip.mp4"
    from mg_ray.data import video_io

    video_io.write_video(video, np.zeros((30, 48, 64, 3), np.uint8))
    bad = subprocess.run(
        command(
            "predict",
            "--model",
            "models:/miga-pose@candidate",
            str(video),
            "--skeleton",
            str(skeleton),
        ),
        check=False,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().count("\n") == 0, bad.stderr[-2000:]
    assert (
        "17 joints per person (layout coco17), but the model was trained on layout imigue22 (22 joints)"
        in bad.stderr
    )
