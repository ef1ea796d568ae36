"""Model files and training checkpoints: what is saved, and the one safe way to load it.

Two kinds of file, both plain dicts of tensors, numbers and strings loaded with
`torch.load(..., weights_only=True)` (a checkpoint cannot run code when loaded):

- a training checkpoint (`checkpoint.pt`, reported to Ray Train every epoch): model, optimiser,
  scheduler, prototypes (the criterion's buffers), epoch, the best state so far, the epoch's
  metrics (`save_checkpoint` / `restore_checkpoint`);
- a model file (`model.pt`, the best model logged to MLflow): the model's *spec* (builder name and
  keyword arguments), its weights, its prototypes, the class names and the data settings a
  predictor needs to turn a clip into tensors (`save_model_file` / `load_model_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"


def model_spec(model_cfg, data_cfg, num_classes: int, pose_channels: int) -> dict[str, Any]:
    """Everything needed to rebuild the network: builder name + keyword arguments."""
    kwargs: dict[str, Any] = {
        "rgb_frames": data_cfg.rgb_frames,
        "pose_frames": data_cfg.pose_frames,
        "pose_channels": pose_channels,
        "modality": model_cfg.modality,
        "fusion": model_cfg.fusion,
        "stream_weights": tuple(model_cfg.stream_weights),
        "rgb_size": data_cfg.rgb_size,
        "embed_pool": model_cfg.embed_pool,
    }
    if model_cfg.embed_dim is not None:
        kwargs["embed_dim"] = model_cfg.embed_dim
    if model_cfg.dropout is not None:
        kwargs["dropout"] = model_cfg.dropout
    return {"preset": model_cfg.preset, "num_classes": num_classes, "kwargs": kwargs}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    from mg_ray.models import build_model

    kwargs = dict(spec["kwargs"])
    if "stream_weights" in kwargs:
        kwargs["stream_weights"] = tuple(kwargs["stream_weights"])
    return build_model(spec["preset"], spec["num_classes"], **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def safe_load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or model file without executing code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or model file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (UnpicklingError for foreign objects, RuntimeError for corrupt zips, ...)
        raise ValueError(
            f"{path}: not a loadable mg-ray checkpoint (weights-only load refused it: {err})"
        ) from None


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
        copy = lambda module: {k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()}
        return cls(epoch, val_top1, copy(model), copy(criterion))


@dataclass
class Resumed:
    """Where a run resumed from its checkpoint picks up."""

    start_epoch: int = 0
    best: Best | None = None
    last_metrics: dict[str, float] | None = None


def save_checkpoint(folder: Path, *, model, criterion, optimizer, scheduler, epoch: int, best: Best,
                    metrics: dict[str, float]) -> Path:
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


def restore_checkpoint(folder: Path, *, model, criterion, optimizer, scheduler) -> Resumed:
    """Load the training checkpoint in `folder` into the objects; returns where to go on."""
    state = safe_load(Path(folder) / CHECKPOINT_FILE)
    unwrap(model).load_state_dict(state["model"])
    criterion.load_state_dict(state["prototypes"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Resumed(state["epoch"] + 1, Best(**state["best"]), state.get("metrics"))


def save_model_file(
    path: Path,
    *,
    spec: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    criterion_state: dict[str, torch.Tensor],
    class_names: list[str],
    data: dict[str, Any],
    metrics: dict[str, float],
) -> Path:
    torch.save(
        {
            "format": "mg-ray-model/1",
            "spec": spec,
            "model": model_state,
            "prototypes": criterion_state,
            "class_names": list(class_names),
            "data": data,
            "metrics": {k: float(v) for k, v in metrics.items()},
        },
        path,
    )
    return path


def load_model_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a model file; returns (model in eval mode, the file's dict)."""
    content = safe_load(path)
    if content.get("format") != "mg-ray-model/1":
        raise ValueError(f"{path}: not an mg-ray model file (format {content.get('format')!r})")
    model = build_from_spec(content["spec"])
    model.load_state_dict(content["model"])
    model.eval()
    return model, content


def resolve_model_file(location: str, tracking_uri: str | None = None) -> Path:
    """A local path to a model file from a path or an MLflow `runs:/<run_id>[/artifact]` URI."""
    if location.startswith("runs:/"):
        import mlflow.artifacts

        uri = location if location.rstrip("/").count("/") > 1 else f"{location.rstrip('/')}/best_model/{MODEL_FILE}"
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
        local = Path(local)
        return local / MODEL_FILE if local.is_dir() else local
    return Path(location).expanduser()
