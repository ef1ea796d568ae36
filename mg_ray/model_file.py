"""The model file: one trained network as a plain dict, and the one safe way to load it.

A model file (`model.pt`) holds the model's *spec* (builder name and keyword arguments), its
weights, its prototypes (the criterion's buffers), the class names, the data settings a
predictor needs to turn a clip into tensors, and the metrics of the epoch it comes from. It is
written by the training loop (the best epoch's model), by `mg-ray import-mmaction2`, and read by
the MLflow pyfunc (`mg_ray.serving`), `mg-ray predict` and a fused model's stream
initialisation.

Every file is loaded with `torch.load(..., weights_only=True)`: loading one cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mg_ray.models import build_model

MODEL_FILE = "model.pt"
FORMAT = "mg-ray-model/1"


def model_spec(model_cfg, data_cfg, num_classes: int, pose_channels: int) -> dict[str, Any]:
    """Everything needed to rebuild the network (a `ModelConfig` and a `DataConfig` in):
    builder name + keyword arguments."""
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
    kwargs = dict(spec["kwargs"])
    if "stream_weights" in kwargs:
        kwargs["stream_weights"] = tuple(kwargs["stream_weights"])
    return build_model(spec["preset"], spec["num_classes"], **kwargs)


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
            "format": FORMAT,
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
    if content.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mg-ray model file (format {content.get('format')!r})")
    model = build_from_spec(content["spec"])
    model.load_state_dict(content["model"])
    model.eval()
    return model, content
