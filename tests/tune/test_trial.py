"""A study's trial is Ray's documented Tune-over-Train pattern: its Train controller is an actor of
its own, so Ray Train's public API works inside a trial as it does anywhere else."""

from __future__ import annotations

import pytest

from mg_ray import tracking
from mg_ray.train.config import load_config

pytestmark = pytest.mark.slow


def _reports_checkpoints_and_what_data_build_gets(config):
    """Three epochs' checkpoints (rank 0's), then what Ray Train says it holds, and what
    `Data.build` gets from the index the driver put in the object store."""
    import tempfile
    from pathlib import Path

    import ray.train
    import torch

    from mg_ray.train.loop import Data

    ctx = ray.train.get_context()
    for epoch in range(3):
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "checkpoint.pt").write_text(str(epoch))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                {"epoch": epoch, "val_top1": 0.1 * epoch},
                checkpoint=checkpoint if ctx.get_world_rank() == 0 else None,
            )
    reported = ray.train.get_all_reported_checkpoints()
    data = Data.build(
        config["experiment"],
        ctx.get_world_rank(),
        ctx.get_world_size(),
        torch.device("cpu"),
        config["index"],
    )
    keypoint = data.index.splits["train"][0].keypoint
    ray.train.report(
        {
            "epoch": 3,
            "reported": len(reported),
            "reported_epochs": [c.metrics["epoch"] for c in reported],
            "shared": not keypoint.flags.writeable,  # mapped from the object store, read-only
            "train": len(data.train_set),
            "val": len(data.val_set),
            "same_index": data.train_set.index is data.val_set.index is data.index,
        }
    )


def _trial(config, index):
    """What `mg_ray.tune.trial.run_trial` does, the study's index included (handed on to the
    workers), with a loop that asks Ray Train for every checkpoint it reported."""
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mg_ray.train.trainer import build_trainer

    cfg = load_config(
        "small",
        {
            "data.root": config["root"],
            "data.num_workers": 0,
            "resources.num_workers": 2,
            "resources.cpus_per_worker": 0.5,
            "tracking.experiment": "t",
        },
    )
    build_trainer(
        cfg,
        name=f"t_{tune.get_context().get_trial_id()}",
        storage_path=config["storage"],
        tracking_uri=config["uri"],
        run_id=config["run_id"],
        callbacks=[TuneReportCallback()],
        index=index if cfg.data.index_source() == index.source else None,
        train_loop=_reports_checkpoints_and_what_data_build_gets,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
    ).fit()


def test_inside_a_trial_ray_train_holds_every_checkpoint_and_workers_read_the_drivers_index(
    ray_cluster, tmp_path, tiny_dataset
):
    """One trial (each trial start takes seconds) serves two checks:

    - `ray.train.get_all_reported_checkpoints()` inside a trial returns every epoch's checkpoint,
      and the controller logs each epoch into the trial's MLflow run, through its UserCallback;
    - the study's driver loads the dataset's index once (`preflight`) and puts it in the object
      store; through Tune's trial and Ray Train's controller every worker gets that one index,
      read-only, for all its splits, instead of parsing the annotation files itself."""
    from ray import tune

    from mg_ray.data import DataConfig, index_for
    from mg_ray.train.loop import SharedIndex

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id, _ = tracking.start_or_resume_run(
        client, tracking.get_or_create_experiment(client, "t"), "trial"
    )
    data = DataConfig(root=tiny_dataset)
    shared = SharedIndex.put(data, index_for(data))
    assert not shared.serves(DataConfig(root=tiny_dataset, annotation_file="other.pkl"))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, index=shared), {"cpu": 0.1}),
        param_space={
            "storage": str(tmp_path / "train"),
            "uri": uri,
            "run_id": run_id,
            "root": str(tiny_dataset),
        },
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    )
    [result] = tuner.fit()
    assert result.error is None, result.error
    assert result.metrics["reported"] == 3 and result.metrics["reported_epochs"] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [0, 1, 2]
    index = index_for(data)
    assert result.metrics["shared"] and result.metrics["same_index"]
    assert result.metrics["train"] == len(index.split("train"))
    assert result.metrics["val"] == len(index.split("val"))
    # On a private local cluster Ray Train starts no preemption watcher (`ray_env.LOCAL_CLUSTER`):
    # the State API lists dead actors too, so none means none was ever started.
    import ray
    from ray.util.state import list_actors

    this_cluster = ray.get_runtime_context().gcs_address  # not another test's, running beside it
    assert not list_actors(
        address=this_cluster, filters=[("class_name", "=", "PreemptionWatcher")], timeout=30
    )
