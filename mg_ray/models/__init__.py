"""The fused prototype model: two-pathway RGB + pose 3D CNN, cross-modal fusion, prototypical
refinement loss (the paper's sections 2.2-2.3; docs/model.md)."""

from mg_ray.models.fusion import CrossModalFusion
from mg_ray.models.net import (
    MicroGestureNet,
    build_model,
    fuse_probabilities,
    load_two_stream_state,
    merge_stream_checkpoints,
    modality_streams,
    paper,
    small,
)
from mg_ray.models.prototype import PrototypeRefinementLoss, TwoStreamCriterion
from mg_ray.models.rgbpose import RGBPoseBackbone, check_frame_counts, check_input_sizes

__all__ = [
    "CrossModalFusion",
    "MicroGestureNet",
    "PrototypeRefinementLoss",
    "RGBPoseBackbone",
    "TwoStreamCriterion",
    "build_model",
    "check_frame_counts",
    "check_input_sizes",
    "fuse_probabilities",
    "load_two_stream_state",
    "merge_stream_checkpoints",
    "modality_streams",
    "paper",
    "small",
]
