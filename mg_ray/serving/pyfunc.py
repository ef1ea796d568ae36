"""The MLflow pyfunc model of an mg-ray classifier: clips in, classes out.

`MicroGestureClassifier` is the `PythonModel`; `classifier.py` (beside this file) is the
models-from-code file MLflow logs with it: two lines that import this class from the installed
`mg_ray` package and hand an instance to `mlflow.models.set_model`. The model's artifacts are
therefore data only, the weights file loaded with `torch.load(weights_only=True)`: nothing in the
registry is unpickled into code (MLflow's default for a `PythonModel` instance is a cloudpickle,
which runs whatever the stored file holds).

Input: a table of clips, one row a clip (`mg_ray.serving.clips`: `video` and `skeleton` as file
bytes, paths or arrays). Params: `num_clips`, the test clips averaged per video (default: the
model's own `test_clips`, the protocol its validation score was measured with).
Output: a DataFrame, one row per clip: `label` (class id), `class_name`, `top5` (class ids, best
first) and `probabilities` (the K fused class probabilities).

Each clip goes through the training's own test pipeline (`PipelineParams.from_config` of the data
settings saved in the model file: the evaluation loop, `mg-ray predict` and this model build it
the same way), so serving computes what the run's validation measured. A row that cannot be read
(not a video, a skeleton of another joint count, an empty clip) fails the request with one line
naming the clip and the field (`MlflowException`, HTTP 400 from `mlflow models serve`).

Models logged before clip input took two preprocessed tensors; their signature still says so,
and `{"rgb": [N, 3, T, H, W], "pose": [N, C, T', h, w]}` still returns [N, K] probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mg_ray.config import from_mapping
from mg_ray.data.config import DataConfig
from mg_ray.data.dataset import PipelineParams, clip_inputs
from mg_ray.data.layouts import get_layout, layout_for_joints
from mg_ray.data.transforms import network_input
from mg_ray.data.video import VideoError
from mg_ray.model_file import load_model_file
from mg_ray.models import fuse_probabilities
from mg_ray.serving.clips import Clip, ClipRequestError, read_clip, request_rows

CODE_FILE = Path(__file__).with_name("classifier.py")


def pipeline_params(data: dict[str, Any]) -> PipelineParams:
    """The test pipeline a model was trained with, from the data settings saved in its model
    file (all of them, through the function that builds the training's pipeline)."""
    cfg = from_mapping(DataConfig, data, "data")
    return PipelineParams.from_config(cfg, get_layout(cfg.layout))


class MicroGestureClassifier(mlflow.pyfunc.PythonModel):
    __doc__ = __doc__

    def load_context(self, context):
        self.load(context.artifacts["model_file"])

    def load(self, model_file: str | Path) -> MicroGestureClassifier:
        """Load the model file (also usable without MLflow, as in tests and benchmarks)."""
        self.model, content = load_model_file(model_file)
        self.class_names = list(content["class_names"])
        self.data = content["data"]
        self.stream_weights = tuple(content["spec"]["kwargs"].get("stream_weights", (1.0, 1.0)))
        self.params = pipeline_params(self.data)
        self.layout = get_layout(self.data["layout"])
        self.reads_rgb = self.model.modality != "pose"
        # a GPU where the process has one (a Ray actor given one, a GPU server), else the CPU
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        return self

    # The hint is np.ndarray, one of the types MLflow infers no schema from: the model has an
    # explicit signature (`mg_ray.tracking.models.save_pyfunc`); without a hint MLflow prints
    # advice to add one every time the model loads.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None):
        if isinstance(model_input, dict) and {"rgb", "pose"} <= set(model_input):
            return self.probabilities(model_input["rgb"], model_input["pose"])  # tensor input
        num_clips = int((params or {}).get("num_clips") or self.data.get("test_clips", 1))
        try:
            rows = request_rows(model_input)
            probs = []
            for i, row in enumerate(rows):
                with read_clip(row, i, needs_video=self.reads_rgb) as clip:
                    probs.append(self.classify_clip(clip, num_clips))
        except ClipRequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return self.table(np.stack(probs) if probs else np.zeros((0, len(self.class_names))))

    def classify_clip(self, clip: Clip, num_clips: int) -> np.ndarray:
        """Fused probabilities [K] of one clip: its `num_clips` test views, averaged."""
        joints = clip.keypoint.shape[2]
        if joints != self.layout.num_joints:
            other = layout_for_joints(joints)
            raise ClipRequestError(
                f"{clip.name}: skeleton: {joints} joints per person "
                f"({'layout ' + other.name if other else 'no known layout'}), but the model was "
                f"trained on layout {self.layout.name} ({self.layout.num_joints} joints)"
            )
        try:
            inputs = clip_inputs(
                clip.video,
                clip.keypoint,
                clip.keypoint_score,
                clip.img_shape,
                self.params,
                mode="test",
                num_clips=num_clips,
                rgb=self.reads_rgb,
            )
        except VideoError as err:
            message = str(err).removeprefix(f"{clip.video}: ")
            raise ClipRequestError(f"{clip.name}: video: {message}") from None
        # the video's `num_clips` views as one batch (a pose-only model gets no rgb)
        return self.probabilities(inputs.rgb, inputs.pose).mean(axis=0)

    def probabilities(self, rgb, pose) -> np.ndarray:
        """Fused class probabilities [N, K] of preprocessed inputs (the network's own tensors)."""
        rgb, pose = (
            None
            if x is None or self.model.modality == skip
            else network_input(torch.as_tensor(x), self.device)
            for x, skip in ((rgb, "pose"), (pose, "rgb"))
        )
        with torch.no_grad():
            return fuse_probabilities(self.model(rgb, pose), self.stream_weights).cpu().numpy()

    def table(self, probs: np.ndarray) -> pd.DataFrame:
        """The output: one row per clip, its label, class name, top-5 ids and probabilities."""
        labels = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        return pd.DataFrame(
            {
                "label": labels.astype(np.int64),
                "class_name": [self.class_names[k] for k in labels],
                "top5": [np.argsort(-p, kind="stable")[:5].tolist() for p in probs],
                "probabilities": [p.astype(np.float64).tolist() for p in probs],
            }
        )
