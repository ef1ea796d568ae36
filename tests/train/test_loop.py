"""Pieces of the per-worker loop that need no Ray: the epoch's shuffle, the lr schedule."""

from __future__ import annotations

from types import SimpleNamespace

from torch.utils.data import DataLoader, DistributedSampler

from mg_ray.train.loop import Data, lr_factor


def test_every_epoch_shuffles_the_shard_anew():
    """Ray Train's `prepare_data_loader` puts a DistributedSampler in the loader, which shuffles
    by the epoch it is told: without `start_epoch`, every epoch sees the same order (a regression
    that once cost the learnability test's RGB model 0.15 of val top-1)."""
    dataset = list(range(40))
    loader = DataLoader(
        dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True)
    )
    data = Data(
        index=None, train_set=dataset, val_set=dataset, train_loader=loader, val_loader=loader
    )
    orders = []
    for epoch in range(3):
        data.start_epoch(epoch)
        orders.append(list(loader.sampler))
    assert orders[0] != orders[1] != orders[2]
    data.start_epoch(1)
    assert list(loader.sampler) == orders[1]  # reproducible: the epoch decides the order


def test_lr_schedule_warms_up_then_steps_down_at_the_milestones():
    factor = lr_factor(SimpleNamespace(warmup_epochs=2, milestones=[3, 5], gamma=0.1))
    assert [round(factor(e), 6) for e in range(7)] == [0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
