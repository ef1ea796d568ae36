"""A training checkpoint resumes a run exactly: after save and restore into freshly built objects,
the next training steps give bit-identical weights, prototypes, optimiser state and lr to those
of the run that never stopped."""

from __future__ import annotations

import math

import pytest
import torch

from mg_ray.models.net import small
from mg_ray.models.prototype import TwoStreamCriterion
from mg_ray.train.checkpoint import CHECKPOINT_FILE, Best, restore_checkpoint, save_checkpoint
from mg_ray.train.config import OptimConfig
from mg_ray.train.loop import lr_factor

K, N = 5, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-identity needs one intra-op thread: with two, CPU conv backward sums its partial
    gradients in an order that varies from call to call (measured: the stem's weights differ in
    the last bits after one step). Other test modules set two threads at import."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed: int = 0):
    """A small fused model, its criterion (prototypes), SGD with momentum and the loop's lr
    schedule (warm-up then a milestone), as the training loop builds them."""
    torch.manual_seed(seed)
    model = small(K, rgb_frames=4, pose_frames=8, rgb_size=32, embed_dim=16)
    criterion = TwoStreamCriterion(K, model.embed_dim, alpha=0.2, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    optim_cfg = OptimConfig(epochs=6, warmup_epochs=2, milestones=[3])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim_cfg))
    return dict(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler)


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    rgb = torch.rand(N, 3, 4, 32, 32, generator=g)
    pose = torch.rand(N, 17, 8, 8, 8, generator=g)
    return rgb, pose, torch.randint(0, K, (N,), generator=g)


def epoch(run: dict, step: int) -> None:
    """One step of training and the scheduler's epoch step, with dropout seeded per step."""
    run["model"].train()
    run["criterion"].train()
    torch.manual_seed(step)
    rgb, pose, labels = batch(step)
    loss = run["criterion"](run["model"](rgb, pose), labels)["loss"]
    run["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    run["optimizer"].step()
    run["scheduler"].step()


def assert_same_state(a: dict, b: dict) -> None:
    for name in ("model", "criterion"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"].state.values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"].state.values()]
    assert len(momentum_a) == len(momentum_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    assert a["optimizer"].param_groups[0]["lr"] == b["optimizer"].param_groups[0]["lr"]


def test_restored_run_continues_bit_identically(tmp_path):
    straight = build()
    for step in range(2):
        epoch(straight, step)
    best = Best.of(1, 0.4, straight["model"], straight["criterion"])
    path = save_checkpoint(
        tmp_path, **straight, epoch=1, best=best, metrics={"val_top1": 0.4, "epoch": 1}
    )
    assert path == tmp_path / CHECKPOINT_FILE

    resumed_run = build(seed=7)  # different initial weights and prototypes: all must be replaced
    resumed = restore_checkpoint(tmp_path, **resumed_run)
    assert resumed.start_epoch == 2
    assert resumed.last_metrics == {"val_top1": 0.4, "epoch": 1.0}
    assert resumed.best.epoch == 1 and resumed.best.val_top1 == 0.4
    for key, value in best.model.items():
        assert torch.equal(resumed.best.model[key], value)
    assert_same_state(straight, resumed_run)

    for step in range(2, 5):  # across the warm-up's end and the milestone
        epoch(straight, step)
        epoch(resumed_run, step)
    assert_same_state(straight, resumed_run)
    assert math.isclose(straight["optimizer"].param_groups[0]["lr"], 0.05 * 0.1)


def test_a_fresh_best_survives_the_round_trip_empty(tmp_path):
    """A checkpoint saved before any validation (best epoch -1, no weights) restores as such."""
    run = build()
    save_checkpoint(tmp_path, **run, epoch=0, best=Best(), metrics={})
    resumed = restore_checkpoint(tmp_path, **build())
    assert resumed.start_epoch == 1
    assert resumed.best.epoch == -1 and resumed.best.model is None
    assert resumed.best.val_top1 == -math.inf


def test_a_checkpoint_that_cannot_be_loaded_is_skipped_for_an_older_one(tmp_path, capsys):
    """The loop's `resume`: a truncated latest checkpoint is named in a warning and the older one
    Ray Train kept is loaded; with none loadable, training starts over (nothing half-loaded)."""
    from ray.train import Checkpoint

    from mg_ray.train.loop import resume

    run = build()
    folders = {e: tmp_path / f"checkpoint_{e}" for e in (1, 2)}
    for e, folder in folders.items():
        folder.mkdir()
        save_checkpoint(folder, **run, epoch=e, best=Best(), metrics={"epoch": e})
    latest = folders[2] / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that filled up mid-write, say
    kept = [Checkpoint.from_directory(folders[e]) for e in (2, 1)]

    resumed = resume(kept[0], build(seed=7), rank=0, older=lambda: kept)
    assert resumed.start_epoch == 2  # the older checkpoint (epoch 1)
    assert f"skipping checkpoint {folders[2]}" in capsys.readouterr().out

    fresh = build(seed=7)
    before = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    resumed = resume(kept[0], fresh, rank=0)  # no older one
    assert resumed.start_epoch == 0 and "training starts over" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in fresh["model"].state_dict().items())


def test_only_checkpoints_ray_train_does_not_hold_are_unregistered(tmp_path):
    """`trainer.unregistered_checkpoints`: in a finished Train run's folder, the checkpoint
    folders that are neither its best nor its latest (what Ray Train holds); files and other
    folders of the run are not checkpoints."""
    from mg_ray.train.trainer import unregistered_checkpoints

    run = tmp_path / "run"
    names = ["checkpoint_2026-12-06_10-00-00.000001", "checkpoint_2026-12-06_10-00-05.000002"]
    names += ["checkpoint_2026-12-06_10-00-09.000003"]
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / CHECKPOINT_FILE).write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own file
    (run / ".validate_storage_marker").mkdir()
    best, orphan, latest = (run / name for name in names)
    assert unregistered_checkpoints(run, [str(best), str(latest)]) == [orphan]
    assert unregistered_checkpoints(run, [best, orphan, latest]) == []
    assert unregistered_checkpoints(tmp_path / "missing", []) == []


def test_the_expected_size_of_a_checkpoint_is_the_size_of_one_written(tmp_path):
    """`checkpoint_mb` (what a study expects before its first checkpoint) against a
    checkpoint written as the loop writes it: after a step of SGD with momentum, with a best."""
    from mg_ray.model_file import build_from_spec
    from mg_ray.train.checkpoint import checkpoint_mb

    spec = {"preset": "small", "num_classes": K, "kwargs": {"rgb_frames": 4, "pose_frames": 8}}
    run = build()
    run["model"] = model = build_from_spec(spec)
    run["criterion"] = TwoStreamCriterion(K, model.embed_dim, alpha=0.2, seed=0)
    run["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run["scheduler"] = torch.optim.lr_scheduler.LambdaLR(run["optimizer"], lambda e: 1.0)
    rgb, pose, labels = torch.rand(2, 3, 4, 64, 64), torch.rand(2, 17, 8, 16, 16), torch.arange(2)
    run["criterion"](model(rgb, pose), labels)["loss"].backward()
    run["optimizer"].step()
    best = Best.of(0, 0.5, model, run["criterion"])
    path = save_checkpoint(tmp_path, **run, epoch=0, best=best, metrics={"val_top1": 0.5})
    written = path.stat().st_size / 2**20
    # (3.04 MB written, 2.86 expected: the file also holds the prototypes, twice, and each
    # tensor's framing, which count for more the smaller the model)
    assert checkpoint_mb(spec) == pytest.approx(written, rel=0.1), written
