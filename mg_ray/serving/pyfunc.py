"""The MLflow pyfunc model of an mg-ray classifier.

`MicroGestureClassifier` is the `PythonModel`; `classifier.py` (beside this file) is the
models-from-code file MLflow logs with it: two lines that import this class from the installed
`mg_ray` package and hand an instance to `mlflow.models.set_model`. The model's artifacts are
therefore data only, the weights file loaded with `torch.load(weights_only=True)`: nothing in the
registry is unpickled into code (MLflow's default for a `PythonModel` instance is a cloudpickle,
which runs whatever the stored file holds).

Input: {"rgb": float32 [N, 3, T, H, W], "pose": float32 [N, C, T', h, w]}
Output: float32 [N, K] fused probabilities. Several clips of one video: predict them as a batch
and average the rows (as `mg-ray predict` does).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

from mg_ray.model_file import load_model_file
from mg_ray.models import fuse_probabilities

CODE_FILE = Path(__file__).with_name("classifier.py")


class MicroGestureClassifier(mlflow.pyfunc.PythonModel):
    __doc__ = __doc__

    def load_context(self, context):
        self.model, content = load_model_file(context.artifacts["model_file"])
        self.class_names = content["class_names"]
        self.data = content["data"]
        self.stream_weights = tuple(content["spec"]["kwargs"].get("stream_weights", (1.0, 1.0)))

    # The hint is np.ndarray, one of the types MLflow infers no schema from: the model has an
    # explicit signature (two named tensors, `mg_ray.tracking.models.save_pyfunc`) and gets them as a
    # dict; without a hint MLflow prints advice to add one every time the model loads.
    def predict(self, context, model_input: np.ndarray, params=None):
        rgb = torch.as_tensor(np.asarray(model_input["rgb"], dtype=np.float32))
        pose = torch.as_tensor(np.asarray(model_input["pose"], dtype=np.float32))
        with torch.no_grad():
            return fuse_probabilities(self.model(rgb, pose), self.stream_weights).numpy()
