"""The micro-gesture data pipeline: dataset folders, sampling, transforms, heatmaps, Dataset.

Public API (re-exported lazily, so `import mg_ray.data.layouts` or `mg_ray.data.config` does not
pull in torch and decord):

    DataConfig, pose_channels                     config.py
    load_index, index_for, DatasetIndex, Annotation,
    AnnotationError, safe_load_pickle             annotations.py
    sample_frames                                 sampling.py
    joint_heatmaps, limb_heatmaps, pose_heatmaps  heatmaps.py
    read_frames, VideoError                       video.py
    MicroGestureDataset, build_dataset,
    clip_inputs, PipelineParams, load_skeleton,
    parse_skeleton                                dataset.py
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "pose_channels": "config",
    "load_index": "annotations",
    "index_for": "annotations",
    "DatasetIndex": "annotations",
    "Annotation": "annotations",
    "AnnotationError": "annotations",
    "safe_load_pickle": "annotations",
    "sample_frames": "sampling",
    "joint_heatmaps": "heatmaps",
    "limb_heatmaps": "heatmaps",
    "pose_heatmaps": "heatmaps",
    "read_frames": "video",
    "VideoError": "video",
    "MicroGestureDataset": "dataset",
    "build_dataset": "dataset",
    "clip_inputs": "dataset",
    "ClipInputs": "dataset",
    "PipelineParams": "dataset",
    "load_skeleton": "dataset",
    "parse_skeleton": "dataset",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (a list, built from the table above)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mg_ray.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mg_ray.data.{module}"), name)


def __dir__() -> list[str]:
    return __all__
