"""Learnability: the small preset, trained for a few CPU minutes on the default synthetic
dataset (10 classes, chance 0.10), reaches validation top-1 of at least 3x chance, and the fused
prediction is at least as good as the better single stream."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import mlflow_client, run, runs

pytestmark = pytest.mark.slow



def test_small_preset_learns_the_default_synthetic_dataset(tmp_path):
    home = tmp_path / "home"  # the default dataset is generated here on first use
    # the small preset's own recipe (12 epochs, about 2.5 minutes on 2 cores)
    run(home, "train", "--set", "data.test_split=null", "--name", "learn", timeout=900)

    client = mlflow_client(home)
    [mlrun] = runs(client, "tags.`mg_ray.train_run` = 'learn'")
    history = {key: {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
               for key in ("val_top1", "val_top1_rgb", "val_top1_pose")}
    best_epoch = max(history["val_top1"], key=lambda step: (history["val_top1"][step], -step))
    fused, rgb, pose = (history[k][best_epoch] for k in ("val_top1", "val_top1_rgb", "val_top1_pose"))
    print(f"best epoch {best_epoch}: fused {fused:.2f}, rgb {rgb:.2f}, pose {pose:.2f}")
    assert fused >= 0.30, history
    assert fused >= max(rgb, pose), history
