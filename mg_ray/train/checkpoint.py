"""Training checkpoints: what a run saves every epoch, and how it resumes from one.

A training checkpoint (`checkpoint.pt`, reported to Ray Train every epoch) is a plain dict of
tensors, numbers and strings: model, optimiser, scheduler, prototypes (the criterion's buffers),
epoch, the best state so far and the epoch's metrics. It is loaded like a model file
(`mg_ray.model_file.safe_load`: weights only, so loading cannot run code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mg_ray.model_file import build_from_spec, safe_load

CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


@dataclass
class Best:
    """The best validation epoch so far and its weights (kept in memory and in checkpoints)."""

    epoch: int = -1
    val_top1: float = -math.inf
    model: dict[str, torch.Tensor] | None = None
    prototypes: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, epoch: int, val_top1: float, model: nn.Module, criterion: nn.Module) -> Best:
        """A CPU copy of the weights and prototypes of `model` and `criterion` now."""
        copy = lambda module: {
            k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()
        }
        return cls(epoch, val_top1, copy(model), copy(criterion))


@dataclass
class Resumed:
    """Where a run resumed from its checkpoint picks up."""

    start_epoch: int = 0
    best: Best | None = None
    last_metrics: dict[str, float] | None = None
    checkpoint: Any = None  # the Ray Train checkpoint it was restored from (`loop.resume`)


def save_checkpoint(
    folder: Path,
    *,
    model,
    criterion,
    optimizer,
    scheduler,
    epoch: int,
    best: Best,
    metrics: dict[str, float],
) -> Path:
    """Write the training checkpoint of `epoch` into `folder` (what Ray Train persists)."""
    path = Path(folder) / CHECKPOINT_FILE
    torch.save(
        {
            "model": unwrap(model).state_dict(),
            "prototypes": criterion.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best": vars(best),
            "metrics": {k: float(v) for k, v in metrics.items()},
        },
        path,
    )
    return path


def checkpoint_mb(spec: dict[str, Any]) -> float:
    """About the size of a training checkpoint of the model `spec` describes, in MB, before one
    is written: the model's weights, the best epoch's weights and SGD's momentum, three copies
    of its float32 state (`save_checkpoint`; the optimiser's momentum covers the parameters, the
    state also holds BatchNorm's buffers). Counted on a copy of the model built on the CPU and
    dropped (PyTorch's meta device would allocate nothing, but its first use takes seconds)."""
    state = sum(t.numel() * t.element_size() for t in build_from_spec(spec).state_dict().values())
    return 3 * state / 2**20


def restore_checkpoint(folder: Path, *, model, criterion, optimizer, scheduler) -> Resumed:
    """Load the training checkpoint in `folder` into the objects; returns where to go on."""
    state = safe_load(Path(folder) / CHECKPOINT_FILE)
    unwrap(model).load_state_dict(state["model"])
    criterion.load_state_dict(state["prototypes"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Resumed(state["epoch"] + 1, Best(**state["best"]), state.get("metrics"))
