"""Suite-wide settings: every test writes under a temporary MG_RAY_HOME, never ~/.mg-ray."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("mg_ray_home")
    old = {k: os.environ.get(k) for k in ("MG_RAY_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["MG_RAY_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
