"""End to end: `mg-ray train` on a real local Ray cluster (2 DDP workers, gloo) with a real
sqlite MLflow store, on the tiny synthetic dataset.

One 8-epoch run serves both tests (it is the suite's time that one run saves): trained with
data settings off the defaults and an unreadable training clip, one of its workers killed
mid-training (SIGKILL, after the first epoch and before the sixth).

- The worker group restarts from the last checkpoint and the run finishes as one MLflow run.
- Its MLflow run is FINISHED with metrics for every epoch and every artifact, and both the Ray
  checkpoint and the logged best model reproduce the logged validation accuracy; its registered
  model predicts the validation split with the run's data settings (`mg-ray predict`'s path) and
  scores the logged accuracy exactly.
- Resumed past its last epoch (the driver died while the final report was being logged), the run
  logs what it lacked.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e.helpers import (
    alive,
    artifact_paths,
    epochs_logged,
    mlflow_client,
    run,
    runs,
    start,
    train_workers,
)

pytestmark = pytest.mark.slow

# The tiny dataset has 10 train clips: one step per epoch per worker at this batch size.
TRAIN_ARGS = (
    "train",
    "--workers",
    "2",
    "--cpus-per-worker",
    "1",
    "--set",
    "data.test_clips=1",
    "--set",
    "optim.warmup_epochs=0",
)
# Data settings off the defaults (crop padding, frame counts, heatmap sigma, limbs): the model
# must be served with them (the first test's check of train/serve skew).
OFF_DEFAULT = ("data.crop_padding=0.5", "data.rgb_frames=4", "data.pose_frames=8")
OFF_DEFAULT += ("data.sigma=1.2", "data.heatmap=limbs")


def fused_top1(model, dataset) -> tuple[float, np.ndarray]:
    """Single-process evaluation of a checkpointed model on a whole split."""
    from mg_ray.data.transforms import network_input
    from mg_ray.models import fuse_probabilities

    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            out = model(network_input(item["rgb"][None]), item["pose"][None])
            probs.append(fuse_probabilities(out, model_stream_weights(model)).numpy()[0])
            labels.append(int(item["label"]))
    probs = np.stack(probs)
    return float((probs.argmax(1) == np.asarray(labels)).mean()), probs


def model_stream_weights(model) -> tuple[float, float]:
    return tuple(getattr(model, "stream_weights", (1.0, 1.0)))


# (8: an epoch takes under a second here, and the kill must find the run training)
EPOCHS = 8


@dataclass
class Trained:
    home: Path
    data: Path
    args: tuple[str, ...]  # the `mg-ray train` command line, less the run's name
    output: str


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Trained:
    """The module's run: `mg-ray train --name e2e-train`, a worker SIGKILLed mid-training."""
    import shutil

    from mg_ray.data import load_index

    folder = tmp_path_factory.mktemp("train")
    # One training clip is unreadable: it is skipped (replaced by another), and counted.
    data = folder / "data"
    shutil.copytree(tiny_dataset, data)
    broken = load_index(data).video_path(load_index(data).split("train")[0].frame_dir)
    broken.write_bytes(broken.read_bytes()[:300])
    home, log = folder / "home", folder / "train.log"
    off_default = [arg for setting in OFF_DEFAULT for arg in ("--set", setting)]
    args = (*TRAIN_ARGS, *off_default, "--data", str(data), "--epochs", str(EPOCHS))
    proc = start(home, *args, "--name", "e2e-train", log=log)
    try:
        client = mlflow_client(home)
        deadline = time.monotonic() + 300
        victim = None
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            found = (
                runs(client, "tags.`mg_ray.train_run` = 'e2e-train'")
                if (home / "mlflow.db").exists()
                else []
            )
            epochs = epochs_logged(client, found[0].info.run_id) if found else 0
            workers = train_workers(proc.pid)
            if 1 <= epochs < EPOCHS - 2 and workers:  # a checkpoint exists, training goes on
                victim = workers[-1]
            time.sleep(0.5)
        assert victim is not None, (
            "never saw a finished epoch with workers alive:\n" + log.read_text()[-4000:]
        )
        victim.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=420) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not alive(proc.pid)
    return Trained(home=home, data=data, args=args, output=log.read_text())


def test_killed_worker_restarts_from_checkpoint_into_one_mlflow_run(trained):
    assert "resumed from the checkpoint of epoch" in trained.output, trained.output[-4000:]
    client = mlflow_client(trained.home)
    [mlrun] = runs(client, "tags.`mg_ray.train_run` = 'e2e-train'")
    assert mlrun.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "val_top1")]
    assert sorted(set(steps)) == list(range(EPOCHS))


def test_train_logs_everything_and_checkpoint_reproduces(trained, tmp_path, monkeypatch):
    from mg_ray.data import build_dataset
    from mg_ray.model_file import build_from_spec, load_model_file, safe_load
    from mg_ray.train.config import load_config

    home, data, train_args, output = trained.home, trained.data, trained.args, trained.output
    assert "val_top1" in output  # the final summary line
    assert "unreadable training clip(s) skipped" in output

    client = mlflow_client(home)
    [mlrun] = runs(client, "tags.`mg_ray.train_run` = 'e2e-train'")
    assert mlrun.info.status == "FINISHED"
    for key in (
        "val_top1",
        "val_top5",
        "val_mean_class_acc",
        "val_top1_rgb",
        "val_top1_pose",
        "train_loss",
        "lr",
    ):
        # (the logged model links the best epoch's val_* metrics by logging them once more)
        steps = {m.step for m in client.get_metric_history(mlrun.info.run_id, key)}
        assert sorted(steps) == list(range(EPOCHS)), key
    assert "test_top1" in mlrun.data.metrics
    assert (
        sum(m.value for m in client.get_metric_history(mlrun.info.run_id, "train_skipped_clips"))
        >= 2
    )  # 1 a epoch
    assert mlrun.data.params["optim.epochs"] == str(EPOCHS)
    assert mlrun.data.params["data.root"] == str(data)
    files = artifact_paths(client, mlrun.info.run_id)
    for expected in (
        "config/resolved_config.yaml",
        "best_model/model.pt",
        "evaluation/val_confusion_matrix.png",
        "evaluation/val_per_class_accuracy.csv",
        "evaluation/val_predictions.npz",
        "evaluation/val_predictions.csv",
        "evaluation/test_confusion_matrix.png",
        "evaluation/test_predictions.npz",
    ):
        assert expected in files, f"{expected} not in {sorted(files)}"
    csv = Path(
        client.download_artifacts(
            mlrun.info.run_id, "evaluation/val_per_class_accuracy.csv", str(tmp_path)
        )
    )
    assert "touch face" in csv.read_text()  # class names, not indices

    # The latest Ray checkpoint (the last epoch's) in a fresh model reproduces its val_top1.
    cfg_file = client.download_artifacts(
        mlrun.info.run_id, "config/resolved_config.yaml", str(tmp_path)
    )
    cfg = load_config(cfg_file, {})
    val_set = build_dataset(cfg.data, cfg.data.val_split, mode="test", num_clips=1)  # all readable
    model_file = client.download_artifacts(mlrun.info.run_id, "best_model/model.pt", str(tmp_path))
    best_model, content = load_model_file(model_file)
    [checkpoint] = sorted((home / "ray_results" / "e2e-train").glob("checkpoint_*/checkpoint.pt"))[
        -1:
    ]
    state = safe_load(checkpoint)
    last = EPOCHS - 1
    assert state["epoch"] == last
    fresh = build_from_spec(content["spec"])
    fresh.load_state_dict(state["model"])
    last_top1 = next(
        m.value for m in client.get_metric_history(mlrun.info.run_id, "val_top1") if m.step == last
    )
    assert fused_top1(fresh, val_set)[0] == pytest.approx(last_top1)

    # The logged best model reproduces best_val_top1 and the logged validation predictions.
    top1, probs = fused_top1(best_model, val_set)
    assert top1 == pytest.approx(mlrun.data.metrics["best_val_top1"])
    best_epoch = int(mlrun.data.metrics["best_epoch"])
    if best_epoch == last:  # the logged predictions are the best epoch's
        with np.load(
            client.download_artifacts(
                mlrun.info.run_id, "evaluation/val_predictions.npz", str(tmp_path)
            )
        ) as npz:
            np.testing.assert_allclose(npz["fused"], probs, atol=1e-4)

    # The driver died while the final report was being logged: its metrics are in, its test
    # predictions are not (removed here from the run's artifact folder). Resumed, the run has
    # no epoch left; it reports its final checkpoint again, and what was missing is logged.
    evaluation = Path(mlrun.info.artifact_uri.removeprefix("file://")) / "evaluation"
    for lost in evaluation.glob("test_*"):
        lost.unlink()
    # ...and a worker's last checkpoint was written, never recorded by Ray Train (the kill came in
    # between): the resumed run ends without it, and says so
    unrecorded = checkpoint.parent.with_name("checkpoint_2099-01-01_00-00-00.000000")
    shutil.copytree(checkpoint.parent, unrecorded)
    again = run(home, *train_args, "--name", "e2e-train", "--resume")
    assert f"resumed from the checkpoint of epoch {last}" in again.stdout + again.stderr
    assert f"removed checkpoint {unrecorded}: written, but never recorded" in again.stdout
    assert not unrecorded.exists() and list(checkpoint.parent.parent.glob("checkpoint_*"))
    assert "evaluation/test_predictions.npz" in artifact_paths(client, mlrun.info.run_id)
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "test_top1")] == [last]
    assert client.get_run(mlrun.info.run_id).info.status == "FINISHED"

    # No train/serve skew: registered, the model predicts the validation split through the
    # registry and `mg-ray predict`'s path (the data settings saved with the model, one clip a
    # video as the loop's validation) and scores the run's best_val_top1 exactly.
    from mg_ray import predict

    assert content["data"]["crop_padding"] == 0.5 and content["data"]["heatmap"] == "limbs"
    run(home, "promote", "--run", mlrun.info.run_id, "--name", "skew-model")
    store = f"sqlite:///{home / 'mlflow.db'}"
    # MLFLOW_TRACKING_URI wins over the argument, as in MLflow, and an earlier test in this
    # process may have set it (`mlflow.set_tracking_uri` does)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model, inner = predict.load_classifier("models:/skew-model@champion", store)
    clips = predict.dataset_clips(data, [], "val")
    probs = predict.classify(model, inner, [(v, s) for v, s, _ in clips], num_clips=1)
    truth = np.array([inner.class_names.index(name) for _, _, name in clips])
    top1 = float(np.mean(probs.argmax(1) == truth))  # the same clips: equal up to float32
    assert top1 == pytest.approx(mlrun.data.metrics["best_val_top1"], abs=1e-6)
