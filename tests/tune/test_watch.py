"""`ResourceWatch` against given cluster totals (no Ray): a cluster too small for one trial is
named once, forgiven when it grows back, and ends the study after `placement_timeout_s`."""

from __future__ import annotations

import pytest

from mg_ray.tune.watch import ResourceWatch, StudyStalled

REQUEST = dict(
    num_workers=2,
    cpus_per_worker=0.9,
    use_gpu=False,
    reserved_cpus=0.05,
    what="each trial of study 'mn'",
)


def test_a_lost_node_that_returns_is_waited_for(capsys):
    watch = ResourceWatch(REQUEST, timeout_s=60)
    watch.check({"CPU": 2.0}, now=0)
    watch.check({"CPU": 1.0}, now=10)  # a node lost
    watch.check({"CPU": 1.0}, now=65)  # 55 s short: still waiting
    watch.check({"CPU": 2.0}, now=69)  # back
    watch.check({"CPU": 1.0}, now=100)  # lost again: the clock starts over
    watch.check({"CPU": 1.0}, now=150)
    out = capsys.readouterr().out
    assert out.count("warning: each trial of study 'mn' needs 1.85 CPUs") == 2
    assert "but the cluster has 1 (a node lost?); waiting up to 60 s" in out
    assert "the cluster has the resources of a trial again" in out


def test_a_cluster_that_stays_too_small_ends_the_study_naming_what_is_missing():
    watch = ResourceWatch(REQUEST, timeout_s=60)
    watch.check({"CPU": 1.0}, now=0)
    with pytest.raises(StudyStalled) as stalled:
        watch.check({"CPU": 1.0}, now=61)
    assert str(stalled.value).startswith(
        "each trial of study 'mn' needs 1.85 CPUs (2 workers x 0.9 CPU + 0.05 for the trial "
        "driver) but the cluster has 1, for 61 s (study.placement_timeout_s: 60); the study stops."
    )
    gpus = ResourceWatch({**REQUEST, "use_gpu": True}, timeout_s=1)
    gpus.check({"CPU": 8.0, "GPU": 1.0}, now=0)
    with pytest.raises(StudyStalled, match="asks for 2 GPU"):
        gpus.check({"CPU": 8.0, "GPU": 1.0}, now=1)


def test_a_cluster_whose_nodes_cannot_hold_a_worker_ends_the_study_too():
    """The totals fit, the nodes' shapes do not (each worker is placed whole on one node): two
    1-CPU nodes hold the two 0.9-CPU workers, a 1.5-CPU node and a 0.5-CPU one hold one."""
    watch = ResourceWatch(REQUEST, timeout_s=60)
    watch.check({"CPU": 2.0}, now=0, nodes=[{"CPU": 1.0}, {"CPU": 1.0}])
    assert watch.short_since is None
    lopsided = [{"CPU": 1.5}, {"CPU": 0.5}]
    watch.check({"CPU": 2.0}, now=10, nodes=lopsided)
    with pytest.raises(StudyStalled) as stalled:
        watch.check({"CPU": 2.0}, now=71, nodes=lopsided)
    assert str(stalled.value).startswith(
        "each trial of study 'mn' needs 2 workers of 0.9 CPU, each whole on one node, but the "
        "nodes of the cluster (1.5 CPU, 0.5 CPU) hold 1, for 61 s"
    )


def test_null_waits_for_ever():
    watch = ResourceWatch(REQUEST, timeout_s=None)
    watch.on_step_end(0, [])  # reads nothing: no Ray needed
    assert watch.short_since is None


def test_a_store_short_of_space_stops_the_study_naming_its_folder(tmp_path):
    from mg_ray.tune.watch import DiskFull, DiskWatch, local_folder

    store = tmp_path / "not-yet-written" / "ray_results"  # read on its nearest existing folder
    DiskWatch([store], min_free_mb=0).check()
    with pytest.raises(DiskFull) as full:
        DiskWatch([store], min_free_mb=1e12).check()  # a petabyte: no disk has that free
    assert str(full.value).startswith(f"{store}: ")
    assert "under study.min_free_disk_mb (1e+12); the study stops" in str(full.value)

    with pytest.raises(DiskFull):  # a trial that failed (to be retried): the disk is checked
        DiskWatch([store], min_free_mb=1e12).on_trial_recover(0, [], trial=None)

    assert local_folder(f"sqlite:///{tmp_path}/mlflow.db") == tmp_path
    assert local_folder(f"file://{tmp_path}/mlartifacts") == tmp_path / "mlartifacts"
    assert local_folder(str(tmp_path / "ray_results")) == tmp_path / "ray_results"
    assert local_folder("http://127.0.0.1:5000") is None
    assert local_folder("s3://bucket/results") is None


def test_the_checkpoints_folder_must_also_hold_the_largest_checkpoint_so_far(tmp_path):
    """Once a trial has written a checkpoint, the next needs as much again: a paper-size one is
    several times the default margin. (A sparse file: its size counts, not the disk it uses.)"""
    import shutil

    from mg_ray.tune.watch import DiskFull, DiskWatch, largest_checkpoint_mb

    train_runs = tmp_path / "quick_train"
    checkpoint = train_runs / "quick_abc" / "checkpoint_2026-12-07_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (train_runs / "quick_abc" / "checkpoint_manager_snapshot.json").write_text("{}")
    with open(checkpoint / "checkpoint.pt", "wb") as f:
        f.truncate(2000 * 2**20)
    assert largest_checkpoint_mb(train_runs) == 2000
    assert largest_checkpoint_mb(tmp_path / "none-yet") == 0

    # a margin 1000 MB under the free space: enough alone, not with the next checkpoint
    margin = max(1.0, shutil.disk_usage(tmp_path).free / 2**20 - 1000)  # (0: no watch)
    DiskWatch([train_runs], margin).check()  # other stores: the margin alone
    watch = DiskWatch([train_runs], margin, checkpoints=train_runs)
    with pytest.raises(
        DiskFull, match=r"plus the largest checkpoint so far \(2000 MB\); the study"
    ):
        watch.check()
    shutil.rmtree(checkpoint)  # Ray keeps a few checkpoints: one it deleted still counts
    with pytest.raises(DiskFull):
        watch.check()


def test_before_any_checkpoint_the_checkpoints_folder_must_hold_one_of_the_studys_model(tmp_path):
    """A study's first checkpoint is guarded too, by the size `checkpoint_mb` expects of its
    model (a paper-size one is about 440 MB, over four times the default margin); the largest
    checkpoint written replaces it once there is one."""
    import shutil

    from mg_ray.model_file import model_spec
    from mg_ray.train.checkpoint import checkpoint_mb
    from mg_ray.train.config import ExperimentConfig
    from mg_ray.tune.watch import DiskFull, DiskWatch

    paper = ExperimentConfig()
    paper.model.preset = "paper"
    # 38.7 M parameters of float32 (BatchNorm's buffers besides), three copies
    assert checkpoint_mb(model_spec(paper.model, paper.data, 32, 17)) == pytest.approx(444, abs=2)

    train_runs = tmp_path / "quick_train"
    margin = max(1.0, shutil.disk_usage(tmp_path).free / 2**20 - 1000)
    watch = DiskWatch([train_runs], margin, checkpoints=train_runs, expected_checkpoint_mb=2000)
    with pytest.raises(DiskFull, match=r"plus a checkpoint of the study's model \(2000 MB\)"):
        watch.check()
    checkpoint = train_runs / "quick_abc" / "checkpoint_2026-12-07_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.pt").write_bytes(b"0" * 2**20)
    watch.check()  # 1 MB written: the study's checkpoints are small after all
